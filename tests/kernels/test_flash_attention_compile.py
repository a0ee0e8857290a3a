"""The compiled (GPU) form of the Triton kernel, built ahead of time for sm_80 and sm_90 on this CPU
machine (Triton ships ptxas): the tile sizes `_launch_config` picks pass Triton's compiler and fit the
GPUs' shared memory, and ptxas spills (almost) no registers for half precision. Timing needs a GPU
(benchmarks/attention_jvp.py); this only checks the code the interpreter does not run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.compiler import ASTSource  # noqa: F401
except ImportError:  # pragma: no cover - a Triton without the ahead-of-time API
    pytest.skip("this Triton has no ahead-of-time compile API", allow_module_level=True)

HERE = Path(__file__).resolve().parent
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # A100, H100 per-block shared memory


def compile_kernels(specs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, str(HERE / "compile_worker.py"), *specs], capture_output=True, text=True,
                       timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    results = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(specs)
    return results


def check(result):
    assert result["cubin_bytes"] > 0
    assert result["shared"] <= SHARED_LIMIT[result["arch"]], result
    if result["dtype"] != "float32" and result["stack"] is not None:
        assert result["stack"] <= 256, f"register spills: {result}"


def test_jvp_kernels_compile_for_a100_and_h100():
    for result in compile_kernels(["90:bfloat16:64:jvp", "80:bfloat16:128:tan"]):
        check(result)


def test_head_dim_160_compiles_within_shared_memory():
    """SD1.x's 160-wide heads pad to 256: register pressure is high (some spills, allowed here), but the
    kernels build and fit the H100's shared memory."""
    for result in compile_kernels(["90:bfloat16:160:jvp", "90:bfloat16:160:tan", "90:bfloat16:160:fwd"]):
        assert result["cubin_bytes"] > 0 and result["shared"] <= SHARED_LIMIT[90], result
        assert result["stack"] is None or result["stack"] <= 1024, result


@pytest.mark.slow
def test_every_autotune_candidate_compiles_within_shared_memory():
    """The tiles the CUDA autotuner times (fewstep_kernels.flash_attention.TILE_CANDIDATES) build for sm_90 and
    fit its shared memory (a candidate that did not would only be timed as infinite; this keeps the list honest).
    Spills are printed, not asserted: the autotuner's timing is what judges them."""
    from fewstep_kernels.flash_attention import TILE_CANDIDATES

    specs = [f"90:bfloat16:{ {64: 64, 128: 128, 256: 160}[width] }:{mode}:{','.join(map(str, tiles))}"
             for (width, mode), cands in TILE_CANDIDATES.items() for tiles in cands]
    for result in compile_kernels(specs):
        print(result)
        assert result["cubin_bytes"] > 0 and result["shared"] <= SHARED_LIMIT[90], result


@pytest.mark.slow
def test_every_kernel_variant_compiles():
    specs = [f"{arch}:{dtype}:{d}:{mode}" for arch in (80, 90) for dtype in ("bfloat16", "float16")
             for d in (40, 64, 80, 128) for mode in ("jvp", "tan", "fwd")]
    specs += [f"{arch}:float32:{d}:{mode}" for arch in (80, 90) for d in (64, 128) for mode in ("jvp", "tan", "fwd")]
    for result in compile_kernels(specs):
        check(result)
