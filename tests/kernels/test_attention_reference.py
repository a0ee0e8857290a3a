"""fewstep_kernels/reference.py and attention.py on the PyTorch path: the chunked reference against
`torch.func.jvp` of math attention in float64, the autograd.Function under torch.func.jvp,
forward_ad, vmap and backward, and the dispatcher."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fewstep_kernels import attention, attention_jvp, resolve_backend
from fewstep_kernels.reference import (
    attention_backward_reference,
    attention_jvp_reference,
    attention_reference,
    query_chunk,
)
from torch.autograd import forward_ad

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

SHAPES = [  # (B, H, Lq, Lk, D)
    (1, 1, 37, 37, 64),
    (2, 3, 70, 70, 40),
    (1, 2, 37, 70, 80),  # cross-attention
    (2, 1, 5, 129, 32),
]


def math_attention(q, k, v, scale=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def qkv(B, H, Lq, Lk, D, dtype=torch.float64, seed=0, tangents=True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D)] * (2 if tangents else 1)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_reference_jvp_matches_func_jvp_in_float64(shape, chunk_size):
    q, k, v, tq, tk, tv = qkv(*shape)
    o_ref, to_ref = torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))
    o, to = attention_jvp_reference(q, k, v, tq, tk, tv, chunk_size=chunk_size)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(to, to_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attention_reference(q, k, v, chunk_size=chunk_size), o_ref, rtol=1e-12, atol=1e-12)


def test_reference_with_explicit_scale():
    q, k, v, tq, tk, tv = qkv(1, 2, 11, 13, 32)
    o_ref, to_ref = torch.func.jvp(lambda a, b, c: math_attention(a, b, c, 0.7), (q, k, v), (tq, tk, tv))
    o, to = attention_jvp(q, k, v, tq, tk, tv, scale=0.7)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(to, to_ref)
    torch.testing.assert_close(attention(q, k, v, scale=0.7), F.scaled_dot_product_attention(q, k, v, scale=0.7))


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_reference_backward_matches_sdpa(shape):
    q, k, v, g = qkv(*shape, tangents=False) + [torch.randn(shape[0], shape[1], shape[2], shape[4],
                                                             dtype=torch.float64)]
    ref = torch.autograd.grad(F.scaled_dot_product_attention(*(t.requires_grad_() for t in (q, k, v))),
                              (q, k, v), g)
    got = attention_backward_reference(q.detach(), k.detach(), v.detach(), g, chunk_size=7)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_query_chunk_bounds_the_score_block():
    q = torch.empty(2, 8, 4096, 64, device="meta")
    k = torch.empty(2, 8, 4096, 64, device="meta")
    step = query_chunk(q, k)
    assert 1 <= step < 4096 and 2 * 8 * step * 4096 <= 1 << 24
    assert query_chunk(q, k, chunk_size=3) == 3
    with pytest.raises(ValueError, match="positive"):
        query_chunk(q, k, chunk_size=0)


@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_autograd_function_under_func_jvp(shape):
    q, k, v, tq, tk, tv = qkv(*shape)
    o_ref, to_ref = torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))
    o, to = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(to, to_ref)
    # a tangent on some inputs only
    _, to_q = torch.func.jvp(lambda a: attention(a, k, v), (q,), (tq,))
    _, to_q_ref = torch.func.jvp(lambda a: math_attention(a, k, v), (q,), (tq,))
    torch.testing.assert_close(to_q, to_q_ref)


def test_autograd_function_under_forward_ad():
    q, k, v, tq, tk, tv = qkv(1, 2, 37, 23, 40)
    _, to_ref = torch.func.jvp(lambda a, c: math_attention(a, k, c), (q, v), (tq, tv))
    with forward_ad.dual_level():
        out = attention(forward_ad.make_dual(q, tq), k, forward_ad.make_dual(v, tv))
        o, to = forward_ad.unpack_dual(out)
    torch.testing.assert_close(o, math_attention(q, k, v))
    torch.testing.assert_close(to, to_ref)


def test_gradcheck_backward_and_forward_ad_against_finite_differences():
    q, k, v = (t.requires_grad_() for t in qkv(1, 1, 3, 4, 4, tangents=False))
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c), (q, k, v), check_forward_ad=True)


def test_backward_through_attention_matches_sdpa():
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 37, 29, 40, tangents=False))
    g = torch.randn(2, 2, 37, 40, dtype=torch.float64)
    got = torch.autograd.grad(attention(q, k, v), (q, k, v), g)
    ref = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), g)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_tangent_is_a_stop_gradient():
    q, k, v, tq, tk, tv = qkv(1, 1, 9, 9, 32)
    q.requires_grad_()
    o, to = attention_jvp(q, k, v, tq, tk, tv)
    assert o.grad_fn is None and to.grad_fn is None and not to.requires_grad


def test_vmap_and_jvp_of_vmap():
    q, k, v, tq, tk, tv = qkv(3, 2, 11, 13, 32)
    torch.testing.assert_close(torch.func.vmap(attention)(q, k, v), math_attention(q, k, v))
    _, to = torch.func.jvp(torch.func.vmap(attention), (q, k, v), (tq, tk, tv))
    _, to_ref = torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(to, to_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    q, k, v, tq, tk, tv = qkv(1, 2, 33, 33, 64, dtype=dtype)
    o, to = attention_jvp(q, k, v, tq, tk, tv)
    assert o.dtype == dtype and to.dtype == dtype
    o_ref, to_ref = torch.func.jvp(math_attention, *[tuple(t.double() for t in ts) for ts in ((q, k, v), (tq, tk, tv))])
    # the only rounding is the final cast to the input dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(o.double(), o_ref, rtol=eps, atol=eps * 4)
    torch.testing.assert_close(to.double(), to_ref, rtol=eps, atol=eps * 4 * to_ref.abs().max().item())


def test_dispatch():
    q, k, v = qkv(1, 1, 8, 8, 32, dtype=torch.float32, tangents=False)
    assert resolve_backend("auto", q, k, v) == "reference"
    assert resolve_backend("reference", q, k, v) == "reference"
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="incompatible attention shapes"):
        attention(q, k[..., :16], v)
    with pytest.raises(ValueError, match="tangent tk"):
        attention_jvp(q, k, v, q, k[:, :, :3], v)
    with pytest.raises(ValueError, match="share a dtype"):
        attention(q, k.double(), v)


def test_triton_backend_on_cpu_without_the_interpreter_says_how_to_enable_it():
    pytest.importorskip("triton")
    from fewstep_kernels import flash_attention

    if flash_attention.INTERPRETED:
        pytest.skip("this process runs triton in interpreter mode")
    q, k, v = qkv(1, 1, 8, 8, 32, dtype=torch.float32, tangents=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        attention(q, k, v, backend="triton")
    wide = qkv(1, 1, 8, 8, 320, dtype=torch.float32, tangents=False)
    with pytest.raises(ValueError, match=r"head dim 320 \(the kernel takes 1..256\)"):
        resolve_backend("triton", *wide)


def test_zero_keys_are_refused():
    q = torch.randn(1, 1, 4, 16)
    empty = torch.randn(1, 1, 0, 16)
    with pytest.raises(ValueError, match="zero keys"):
        attention(q, empty, empty)


def test_double_backward_raises_instead_of_returning_zero():
    q, k, v = (torch.randn(1, 2, 5, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    (g,) = torch.autograd.grad(attention(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), k)
