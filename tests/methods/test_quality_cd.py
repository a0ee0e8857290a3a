"""Quality bars for consistency distillation on the built-in teachers (slow: minutes on 2 cores).

CD's 1-step metric must be at most 0.3x the teacher's own 1-step Euler metric, and its 4-step metric
at most 2x the teacher's best (its default 50-step Heun), on the built-in metric with the same
number of samples.
"""

import subprocess
import sys

import pytest

from fewstep.training import distill


def _table(res):
    return {(r["model"], r["steps"]): r["value"] for r in res["table"]}


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["toy:checkerboard", "digits"])
def test_cd_quality_bar(tmp_path, teacher):
    res = distill(method="cd", teacher=teacher, out=str(tmp_path / "run"), sample_every=0, checkpoint_every=0)
    t = _table(res)
    best = t[("teacher (best)", 50)]
    print(teacher, t)
    assert t[("student", 1)] <= 0.3 * t[("teacher", 1)]
    assert t[("student", 4)] <= 2.0 * best


@pytest.mark.slow
def test_default_main_job(tmp_path):
    """`fewstep distill` with no arguments: CD on toy:checkerboard, a table, a student that beats
    the teacher's 1-step sample by far."""
    import json

    proc = subprocess.run([sys.executable, "-m", "fewstep.cli", "distill", "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["method"] == "cd" and res["teacher"] == "toy:checkerboard" and res["finished"]
    t = _table(res)
    assert t[("student", 1)] <= 0.3 * t[("teacher", 1)]
    assert list((tmp_path / "runs").iterdir())[0].joinpath("student", "model.safetensors").is_file()
