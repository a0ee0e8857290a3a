"""The examples run as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_custom_teacher_example_converges_to_the_mixture():
    p = subprocess.run([sys.executable, "examples/custom_teacher.py"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = dict(ln.rsplit(":", 1) for ln in p.stdout.strip().splitlines())
    floor = float(lines["data-vs-data SWD floor"])
    swd4 = float(lines["euler      4 steps"].split()[-1])
    swd50 = float(lines["euler     50 steps"].split()[-1])
    assert swd50 < 2 * floor < swd4  # more steps converge to the exact mixture


def test_quality_gate_script():
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.run(["bash", "examples/quality_gate.sh", "toy:checkerboard", "0.1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "bad input -> exit 2: error: unknown solver 'bogus'" in p.stdout
    # an impossible gate fails the script
    p = subprocess.run(["bash", "examples/quality_gate.sh", "toy:checkerboard", "0.0001"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 1


def test_cd_digits_recipe_loads_and_runs(tmp_path):
    import yaml

    from fewstep.training import distill

    recipe = ROOT / "examples" / "cd_digits.yaml"
    res = distill(str(recipe), out=str(tmp_path / "run"), iters=2, batch_size=4, eval=False, sample_every=0)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    written = yaml.safe_load(recipe.read_text())
    assert res["iterations"] == 2 and saved["options"] == written["options"] and saved["teacher"] == "digits"
