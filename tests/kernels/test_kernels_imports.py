"""fewstep_kernels beside transformers and diffusers: importing it (and running its kernel in the
interpreter) must not shadow the Hugging Face `kernels` package that transformers probes for, and
a plain import or a CPU call must not pull in triton."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_transformers_and_diffusers_import_beside_fewstep_kernels():
    pytest.importorskip("triton")
    code = (
        "import sys, torch\n"
        "import fewstep_kernels, fewstep.models\n"
        "q = torch.randn(1, 1, 17, 32)\n"
        "fewstep_kernels.attention(q, q, q)\n"
        "print('triton' in sys.modules)\n"
        "o, to = fewstep_kernels.attention_jvp(q, q, q, q, q, q, backend='triton')\n"
        "from transformers import CLIPTextModel\n"
        "import diffusers\n"
        "from diffusers import UNet2DConditionModel\n"
        "print('ok', to.shape[-2])\n"
    )
    # the working directory (the repo root, which holds kernels/) is first on sys.path
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[-3:] == ["False", "ok", "17"]
