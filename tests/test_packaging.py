"""Packaging facts: the kernels folder is importable under a project name and does not shadow the
Hugging Face `kernels` package that transformers probes for (see shared/ENVIRONMENT.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fewstep_kernels_importable():
    import fewstep_kernels

    assert Path(fewstep_kernels.__file__).parent == ROOT / "kernels" / "fewstep_kernels"


def test_transformers_and_diffusers_import_beside_the_kernels_folder():
    # `python -c` puts the working directory (the repo root, which holds kernels/) first on sys.path.
    code = (
        "import fewstep, fewstep_kernels\n"
        "from transformers import CLIPTextModel\n"
        "import diffusers\n"
        "from diffusers import UNet2DModel\n"
        "print('ok')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().endswith("ok")


def test_no_top_level_kernels_package_installed():
    """fewstep never installs its kernels/ folder as a top-level `kernels` module. Another distribution may
    (transformers 5.x depends on Hugging Face's `kernels` package): whatever `kernels` resolves to outside the
    repository must not be ours, and the fewstep distribution must declare no `kernels` top-level name."""
    import importlib.util

    code = (
        "import importlib.metadata as md, importlib.util, json\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps({'origin': None if spec is None else spec.origin,\n"
        "                  'locations': None if spec is None else list(spec.submodule_search_locations or []),\n"
        "                  'owners': md.packages_distributions().get('kernels', []),\n"
        "                  'top_level': (md.distribution('fewstep').read_text('top_level.txt') or '').split()}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    import json

    found = json.loads(p.stdout.strip().splitlines()[-1])
    ours = (ROOT / "kernels").resolve()
    for place in [found["origin"], *(found["locations"] or [])]:
        if place is not None:
            assert ours not in Path(place).resolve().parents and Path(place).resolve() != ours, found
    assert "fewstep" not in found["owners"], found
    assert "kernels" not in found["top_level"] and "fewstep_kernels" in found["top_level"], found
    assert importlib.util.find_spec("fewstep_kernels") is not None


def test_console_script_declared():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["fewstep"] == "fewstep.cli:main"
    assert meta["project"]["requires-python"] == ">=3.10"
