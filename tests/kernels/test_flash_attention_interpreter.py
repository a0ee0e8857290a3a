"""The Triton kernel (fewstep_kernels/flash_attention.py) on CPU, in Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is imported and affects the whole process, so every
kernel call of this module runs in ONE subprocess (interpreter_worker.py); the references
(`torch.func.jvp` of plain math attention in float64) are computed here. Shapes are small: the
interpreter is numpy, about 0.1 s for one head x 256 tokens x dim 64.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

# name: (op, B, H, Lq, Lk, D, dtype, scale)
CASES = {
    "self_L37_d64": ("jvp", 1, 2, 37, 37, 64, torch.float32, None),
    "self_L70_d40": ("jvp", 2, 1, 70, 70, 40, torch.float32, None),
    "self_L130_d64": ("jvp", 1, 1, 130, 130, 64, torch.float32, None),
    "self_L19_d16": ("jvp", 1, 1, 19, 19, 16, torch.float32, None),
    "cross_37x70_d80": ("jvp", 1, 2, 37, 70, 80, torch.float32, None),
    "cross_70x9_d32": ("jvp", 1, 1, 70, 9, 32, torch.float32, None),
    "scale_03": ("jvp", 1, 1, 40, 33, 64, torch.float32, 0.3),
    "strided": ("jvp_strided", 2, 3, 21, 21, 40, torch.float32, None),
    "mixed_layout": ("jvp_mixed_layout", 2, 3, 21, 21, 40, torch.float32, None),
    "split_batches": ("jvp_split_batches", 3, 2, 19, 23, 32, torch.float32, None),
    "bf16_L45_d64": ("jvp", 1, 2, 45, 45, 64, torch.bfloat16, None),
    "bf16_cross_d40": ("jvp", 1, 1, 37, 70, 40, torch.bfloat16, None),
    "fp16_L33_d128": ("jvp", 1, 1, 33, 33, 128, torch.float16, None),
    # head dims of real models not yet above: 96 (padded to 128) and 160 (SD1.x's deepest blocks, padded to 256)
    "self_L21_d96": ("jvp", 1, 1, 21, 21, 96, torch.float32, None),
    "bf16_L19_d80": ("jvp", 1, 1, 19, 19, 80, torch.bfloat16, None),
    "cross_17x23_d160": ("jvp", 1, 1, 17, 23, 160, torch.float32, None),
    "bf16_L17_d160": ("jvp", 1, 1, 17, 17, 160, torch.bfloat16, None),
    "forward_d160": ("forward", 1, 1, 21, 21, 160, torch.float32, None),
    "autotuned": ("autotuned_jvp", 1, 2, 19, 23, 128, torch.bfloat16, None),
    # head dims under 16 (the tiny test pipelines: 8) pad to 16
    "bf16_L19_d8": ("jvp", 1, 2, 19, 19, 8, torch.bfloat16, None),
    "forward_L37_d40": ("forward", 2, 1, 37, 37, 40, torch.float32, None),
    "forward_bf16": ("forward", 1, 1, 50, 50, 64, torch.bfloat16, None),
    "func_jvp": ("func_jvp", 1, 2, 37, 29, 40, torch.float32, None),
    "func_jvp_q_only": ("func_jvp_q_only", 1, 1, 33, 33, 32, torch.float32, None),
    "func_jvp_bf16": ("func_jvp", 1, 2, 45, 29, 64, torch.bfloat16, None),
    "func_jvp_d128": ("func_jvp", 1, 1, 20, 37, 128, torch.float16, 0.2),
    "forward_ad": ("forward_ad", 1, 2, 37, 37, 64, torch.float32, None),
    "vmap_jvp": ("vmap_jvp", 2, 2, 21, 21, 32, torch.float32, None),
    "backward": ("backward", 1, 2, 37, 29, 40, torch.float32, None),
    "dispatch": ("dispatch", 1, 1, 17, 17, 32, torch.float32, None),
}


def make_inputs(name, op, B, H, Lq, Lk, D, dtype):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    lead = (2, B, H) if op == "vmap_jvp" else (B, H)  # vmap_jvp: an extra leading dim to map over
    x = {
        "q": torch.randn(*lead, Lq, D, generator=g),
        "k": torch.randn(*lead, Lk, D, generator=g),
        "v": torch.randn(*lead, Lk, D, generator=g),
        "tq": torch.randn(*lead, Lq, D, generator=g),
        "tk": torch.randn(*lead, Lk, D, generator=g),
        "tv": torch.randn(*lead, Lk, D, generator=g),
        "grad": torch.randn(*lead, Lq, D, generator=g),
    }
    return {key: t.to(dtype) for key, t in x.items()}


def math_attention(q, k, v, scale=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def expected(x, scale):
    """(o, to) from torch.func.jvp of math attention in float64 on the same (rounded) inputs."""
    p = [x[key].double() for key in ("q", "k", "v", "tq", "tk", "tv")]
    return torch.func.jvp(lambda a, b, c: math_attention(a, b, c, scale), tuple(p[:3]), tuple(p[3:]))


@pytest.fixture(scope="module")
def kernel_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interpreter")
    inputs, cases = {}, []
    for name, (op, B, H, Lq, Lk, D, dtype, scale) in CASES.items():
        for key, t in make_inputs(name, op, B, H, Lq, Lk, D, dtype).items():
            inputs[f"{name}.{key}"] = t
        cases.append({"name": name, "op": op, "scale": scale})
    (tmp / "cases.json").write_text(json.dumps(cases))
    save_file(inputs, str(tmp / "inputs.safetensors"))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "interpreter_worker.py"), str(tmp / "cases.json"),
         str(tmp / "inputs.safetensors"), str(tmp / "outputs.safetensors")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    outputs = load_file(str(tmp / "outputs.safetensors"))
    timings = json.loads((tmp / "outputs.safetensors.json").read_text())
    return inputs, outputs, timings


def case_tensors(run, name):
    inputs, outputs, _ = run
    x = {key.rsplit(".", 1)[1]: t for key, t in inputs.items() if key.startswith(name + ".")}
    y = {key.rsplit(".", 1)[1]: t for key, t in outputs.items() if key.startswith(name + ".")}
    return x, y


def tolerance(dtype):
    return {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]


JVP_CASES = [n for n, c in CASES.items() if c[0] in ("jvp", "jvp_strided", "jvp_mixed_layout", "jvp_split_batches",
                                                      "func_jvp", "autotuned_jvp",
                                                      "forward_ad")]


@pytest.mark.parametrize("name", JVP_CASES)
def test_kernel_jvp_matches_func_jvp_of_math_attention(kernel_run, name):
    op, B, H, Lq, Lk, D, dtype, scale = CASES[name]
    x, y = case_tensors(kernel_run, name)
    o_ref, to_ref = expected(x, scale)
    assert y["o"].dtype == dtype and y["to"].dtype == dtype
    assert y["o"].shape == (B, H, Lq, D) and y["to"].shape == (B, H, Lq, D)
    tol = tolerance(dtype)
    torch.testing.assert_close(y["o"].double(), o_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(y["to"].double(), to_ref, rtol=tol, atol=tol * max(1.0, to_ref.abs().max().item()))


@pytest.mark.parametrize("name", ["bf16_L45_d64", "bf16_cross_d40", "fp16_L33_d128", "func_jvp_bf16", "bf16_L19_d80",
                                  "bf16_L17_d160", "bf16_L19_d8"])
def test_low_precision_kernel_matches_reference_backend(kernel_run, name):
    """Half-precision kernel vs the PyTorch reference on the same inputs: same fp32 accumulation,
    the kernel rounds P to the input dtype before its P v products (as FlashAttention does)."""
    from fewstep_kernels import attention_jvp

    x, y = case_tensors(kernel_run, name)
    o, to = attention_jvp(x["q"], x["k"], x["v"], x["tq"], x["tk"], x["tv"], scale=CASES[name][-1],
                          backend="reference")
    tol = tolerance(x["q"].dtype)
    torch.testing.assert_close(y["o"].float(), o.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(y["to"].float(), to.float(), rtol=tol, atol=tol * max(1.0, to.abs().max().item()))


@pytest.mark.parametrize("name", ["forward_L37_d40", "forward_bf16", "forward_d160", "dispatch"])
def test_plain_forward_kernel_matches_sdpa(kernel_run, name):
    x, y = case_tensors(kernel_run, name)
    ref = torch.nn.functional.scaled_dot_product_attention(*(x[key].double() for key in ("q", "k", "v")))
    tol = tolerance(x["q"].dtype)
    torch.testing.assert_close(y["o"].double(), ref, rtol=tol, atol=tol)


def test_autotuner_times_every_candidate_and_launches_the_fastest(kernel_run):
    """The CUDA launch path (triton.autotune over `tile_candidates`), in the interpreter with a stand-in timer
    that makes each later candidate faster: all of the variant's candidates are timed, the fastest runs (and its
    result is checked against math attention by the JVP test above)."""
    from fewstep_kernels import flash_attention as fa

    _, y = case_tensors(kernel_run, "autotuned")
    candidates = fa.tile_candidates(128, True, True, fa.DOT_UPCAST)
    assert int(y["timed"]) == len(candidates) > 1
    assert tuple(y["chosen"].tolist()) == sorted(candidates)[-1]  # timed last (in the tuner's sorted order)


def test_jvp_with_only_a_query_tangent(kernel_run):
    x, y = case_tensors(kernel_run, "func_jvp_q_only")
    q, k, v, tq = (x[key].double() for key in ("q", "k", "v", "tq"))
    o_ref, to_ref = torch.func.jvp(lambda a: math_attention(a, k, v), (q,), (tq,))
    torch.testing.assert_close(y["o"].double(), o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y["to"].double(), to_ref, rtol=1e-4, atol=1e-4)


def test_vmap_of_jvp_folds_into_the_kernel_batch(kernel_run):
    x, y = case_tensors(kernel_run, "vmap_jvp")
    o_ref, to_ref = expected(x, None)  # math attention broadcasts over the extra leading dim
    assert y["to"].shape == x["q"].shape
    torch.testing.assert_close(y["o"].double(), o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y["to"].double(), to_ref, rtol=1e-4, atol=1e-4)


def test_backward_through_the_kernel_forward_matches_sdpa(kernel_run):
    x, y = case_tensors(kernel_run, "backward")
    q, k, v = (x[key].double().requires_grad_() for key in ("q", "k", "v"))
    torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(x["grad"].double())
    for key, ref in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        torch.testing.assert_close(y[key].double(), ref, rtol=1e-4, atol=1e-4)


def test_auto_backend_keeps_cpu_tensors_on_the_reference(kernel_run):
    _, y = case_tensors(kernel_run, "dispatch")
    assert bool(y["auto_is_reference"])


def test_every_case_ran_in_the_interpreter(kernel_run):
    """Every case produced outputs (the time is printed with -s, never asserted)."""
    timings = kernel_run[2]
    assert set(timings) == set(CASES)
    print(f"interpreter kernel time: {sum(timings.values()):.1f} s over {len(timings)} cases")
