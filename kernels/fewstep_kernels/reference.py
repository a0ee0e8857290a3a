"""Pure-PyTorch attention, its forward-mode tangent and its gradient, chunked over queries.

These are the references the Triton kernels are tested against, and the fallback the dispatcher
uses where the kernels cannot run (CPU without the interpreter, no Triton installed). Every
function works on (B, H, L, D) tensors like `F.scaled_dot_product_attention` and keeps memory at
O(B * H * chunk * Lk) by walking over blocks of queries; arithmetic is in at least float32.

Math (softmax attention, no mask): S = q k^T * scale, P = softmax(S), o = P v. Along a tangent
(tq, tk, tv): dS = (tq k^T + q tk^T) * scale, dP = P * (dS - rowsum(P * dS)), to = dP v + P tv.
"""

from __future__ import annotations

import math

import torch

# Elements of one (B, H, chunk, Lk) score block held at a time (about 64 MB in float32).
_CHUNK_ELEMENTS = 1 << 24


def default_scale(head_dim: int) -> float:
    """1 / sqrt(D), the scale `F.scaled_dot_product_attention` uses when none is given."""
    return 1.0 / math.sqrt(head_dim)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, the input dtype for float32 and float64."""
    return torch.promote_types(dtype, torch.float32)


def query_chunk(q: torch.Tensor, k: torch.Tensor, chunk_size: int | None = None) -> int:
    """How many queries to process at once so that one score block stays near `_CHUNK_ELEMENTS`."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        return int(chunk_size)
    rows = math.prod(q.shape[:-2]) * max(1, k.shape[-2])
    return max(1, min(q.shape[-2], _CHUNK_ELEMENTS // max(1, rows)))


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """(..., Lq, D) queries against (..., Lk, D) keys and (..., Lk, Dv) values, usually (B, H, L, D)."""
    if q.dim() < 2 or q.dim() != k.dim() or k.dim() != v.dim():
        raise ValueError(f"attention expects (B, H, L, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible attention shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[-2] == 0:
        raise ValueError("attention over zero keys is undefined (softmax of an empty row)")


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        chunk_size: int | None = None) -> torch.Tensor:
    """o = softmax(q k^T * scale) v, one block of queries at a time. Plain autograd through it keeps
    every block's P; `attention` has the memory-bounded backward."""
    check_shapes(q, k, v)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    ct = compute_dtype(q.dtype)
    kc, vc = k.to(ct), v.to(ct)
    step = query_chunk(q, k, chunk_size)
    outs = []
    for start in range(0, q.shape[-2], step):
        qc = q[..., start:start + step, :].to(ct)
        p = torch.softmax(qc @ kc.transpose(-1, -2) * scale, dim=-1)
        outs.append((p @ vc).to(q.dtype))
    return torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]


def attention_jvp_reference(q, k, v, tq, tk, tv, scale: float | None = None, chunk_size: int | None = None):
    """(o, to): attention and its directional derivative along (tq, tk, tv), chunked over queries.

    to = P (dS - mu) v + P tv with mu = rowsum(P * dS) (the softmax JVP), both in float32 or wider.
    """
    check_shapes(q, k, v)
    for name, t, x in (("tq", tq, q), ("tk", tk, k), ("tv", tv, v)):
        if t.shape != x.shape:
            raise ValueError(f"tangent {name} has shape {tuple(t.shape)}, expected {tuple(x.shape)}")
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    ct = compute_dtype(q.dtype)
    kc, vc, tkc, tvc = k.to(ct), v.to(ct), tk.to(ct), tv.to(ct)
    kt, tkt = kc.transpose(-1, -2), tkc.transpose(-1, -2)
    step = query_chunk(q, k, chunk_size)
    outs, touts = [], []
    for start in range(0, q.shape[-2], step):
        qc = q[..., start:start + step, :].to(ct)
        tqc = tq[..., start:start + step, :].to(ct)
        p = torch.softmax(qc @ kt * scale, dim=-1)
        ds = (tqc @ kt + qc @ tkt) * scale
        mu = (p * ds).sum(-1, keepdim=True)
        outs.append((p @ vc).to(q.dtype))
        touts.append(((p * (ds - mu)) @ vc + p @ tvc).to(q.dtype))
    if len(outs) == 1:
        return outs[0], touts[0]
    return torch.cat(outs, dim=-2), torch.cat(touts, dim=-2)


def attention_backward_reference(q, k, v, grad_out, scale: float | None = None, chunk_size: int | None = None):
    """(dq, dk, dv) of o = softmax(q k^T * scale) v, recomputing P block by block (FlashAttention's
    backward, Dao et al. 2022): dv = P^T do, dP = do v^T, dS = P * (dP - rowsum(do * o)),
    dq = dS k * scale, dk = dS^T q * scale."""
    check_shapes(q, k, v)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    ct = compute_dtype(q.dtype)
    kc, vc = k.to(ct), v.to(ct)
    kt = kc.transpose(-1, -2)
    dk = torch.zeros_like(kc)
    dv = torch.zeros_like(vc)
    dqs = []
    step = query_chunk(q, k, chunk_size)
    for start in range(0, q.shape[-2], step):
        qc = q[..., start:start + step, :].to(ct)
        doc = grad_out[..., start:start + step, :].to(ct)
        p = torch.softmax(qc @ kt * scale, dim=-1)
        dv += p.transpose(-1, -2) @ doc
        dp = doc @ vc.transpose(-1, -2)
        delta = (dp * p).sum(-1, keepdim=True)  # = rowsum(do * o)
        ds = p * (dp - delta)
        dqs.append((ds @ kc) * scale)
        dk += (ds.transpose(-1, -2) @ qc) * scale
    dq = torch.cat(dqs, dim=-2) if len(dqs) > 1 else dqs[0]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
