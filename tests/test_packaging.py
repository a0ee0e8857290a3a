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
    import importlib.util

    p = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('kernels'))"],
                       cwd="/", capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "None", p.stdout
    assert importlib.util.find_spec("fewstep_kernels") is not None


def test_console_script_declared():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["fewstep"] == "fewstep.cli:main"
    assert meta["project"]["requires-python"] == ">=3.10"
