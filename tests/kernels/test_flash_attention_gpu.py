"""The compiled Triton kernel on CUDA at real sizes, against the PyTorch reference (which accumulates in
float32 without rounding P). Run with `pytest -m gpu tests/kernels`; skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]


def make(B, H, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D)] * 2
    return [torch.randn(s, generator=g, device="cuda", dtype=torch.float32).to(dtype) for s in shapes]


def assert_close_rel(got, ref, tol):
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= tol * max(1.0, scale), f"max error {err:.3e} (reference max {scale:.3e}, tol {tol})"


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_jvp_at_4k_tokens(D, dtype):
    from fewstep_kernels import attention_jvp

    x = make(2, 8, 4096, 4096, D, dtype)
    o, to = attention_jvp(*x, backend="triton")
    o_ref, to_ref = attention_jvp(*x, backend="reference")
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert_close_rel(o, o_ref, tol)
    assert_close_rel(to, to_ref, tol)


@pytest.mark.parametrize("Lq,Lk,D", [(1000, 77, 80), (4096, 333, 40), (257, 4099, 128)])
def test_kernel_jvp_cross_attention_odd_sizes_fp32(Lq, Lk, D):
    from fewstep_kernels import attention_jvp

    x = make(1, 4, Lq, Lk, D, torch.float32)
    o, to = attention_jvp(*x, backend="triton")
    o_ref, to_ref = attention_jvp(*x, backend="reference")
    assert_close_rel(o, o_ref, 1e-4)
    assert_close_rel(to, to_ref, 1e-4)


def test_plain_forward_kernel_matches_sdpa():
    from fewstep_kernels import attention

    q, k, v = make(2, 8, 4096, 4096, 64, torch.bfloat16)[:3]
    assert_close_rel(attention(q, k, v, backend="triton"), torch.nn.functional.scaled_dot_product_attention(q, k, v),
                     2e-2)


def test_auto_dispatch_uses_the_kernel_and_func_jvp_runs_it(monkeypatch):
    from fewstep_kernels import attention, attention_jvp, flash_attention, resolve_backend

    q, k, v, tq, tk, tv = make(1, 2, 1024, 1024, 64, torch.bfloat16)
    assert resolve_backend("auto", q, k, v) == "triton"
    assert resolve_backend("auto", q.float(), k.float(), v.float()) == "reference"  # fp32: kernel only if asked
    calls = []
    original = flash_attention.flash_attention_tangent  # forward-mode AD: tangent kernel given the forward's o
    monkeypatch.setattr(flash_attention, "flash_attention_tangent", lambda *a: calls.append(1) or original(*a))
    _, to = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    assert calls == [1]
    _, to_ref = attention_jvp(q, k, v, tq, tk, tv, backend="reference")
    assert_close_rel(to, to_ref, 2e-2)


def test_backward_on_cuda_matches_sdpa():
    from fewstep_kernels import attention

    q, k, v = (t.requires_grad_() for t in make(1, 4, 1024, 777, 64, torch.float32)[:3])
    g = torch.randn(1, 4, 1024, 64, device="cuda")
    got = torch.autograd.grad(attention(q, k, v), (q, k, v), g)
    ref = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, k, v), (q, k, v), g)
    for a, b in zip(got, ref, strict=True):
        assert_close_rel(a, b, 1e-3)
