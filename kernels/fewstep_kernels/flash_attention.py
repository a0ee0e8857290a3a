"""Triton flash attention (Dao et al. 2022) forward, with an optional fused forward-mode JVP.

One program handles BLOCK_M queries of one (batch, head) and streams over the keys in blocks of
BLOCK_N with an online softmax (running max m, running normaliser l = sum_j exp(s_ij - m)), so
memory is O(L) and nothing of size Lq x Lk is ever written.

Fused JVP (the tangent sCM/rCM training needs, Lu & Song 2024; Zheng et al. 2025): with
S = q k^T * scale, P = softmax(S) and dS = (tq k^T + q tk^T) * scale,

    dP = P * (dS - mu),  mu_i = sum_j P_ij dS_ij,    to = dP v + P tv.

With unnormalised weights p_ij = exp(s_ij - m_i) and l_i = sum_j p_ij, all sums below are
rescaled by exp(m_old - m_new) like the output accumulator, and combined once at the end:

    A = sum_j p_ij v_j,  c_i = sum_j p_ij dS_ij,  B = sum_j p_ij dS_ij v_j,  T = sum_j p_ij tv_j
    o = A / l,  mu = c / l,  to = (B - mu * A) / l + T / l = ((B + T) - mu * A) / l.

B and T share one accumulator, so the JVP kernel carries two (BLOCK_M, BLOCK_D) float32 tiles
(A and B + T) instead of three; register pressure is what limits its tile sizes.

Head dims that are not powers of two (40, 80, 96, 160) are padded to one with masked loads; sequence
lengths are masked, so any Lq and Lk work, and Lq != Lk gives cross-attention. Accumulation is in
float32 whatever the input dtype; probabilities are cast to the value dtype before the P v dots, as
in FlashAttention. On CPU the same kernel runs in Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton is optional: an extra for GPUs, and the interpreter for tests on CPU.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None
# Triton decides at import whether `@triton.jit` compiles or interprets (TRITON_INTERPRET=1, which
# must be set before triton is first imported); interpreted kernels take CPU tensors.
INTERPRETED = TRITON_AVAILABLE and bool(triton.knobs.runtime.interpret)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 1, 256
_MAX_GRID_Y = 65535


def _jit(fn):
    return triton.jit(fn) if TRITON_AVAILABLE else fn


# How _mma multiplies: tensor cores in the input dtype (half types), exact float32 (the interpreter's
# float32), three TF32 products (float32 on GPUs: ~float32 accuracy on tensor cores; exact-FP32 dots
# need so many registers that ptxas spills heavily, and crash LLVM for some tiles), or bf16 upcast.
DOT_NATIVE, DOT_IEEE, DOT_TF32X3, DOT_UPCAST = 0, 1, 2, 3


@_jit
def _mma(a, b, MODE: tl.constexpr):
    """a @ b accumulated in float32, in one of the DOT_* modes. DOT_UPCAST multiplies bfloat16 tiles
    as float32 (exact conversion, the same products as a bf16 MMA with fp32 accumulation); only the
    interpreter needs it, its dot multiplies bf16 bit patterns."""
    if MODE == 3:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif MODE == 2:
        c = tl.dot(a, b, input_precision="tf32x3")
    elif MODE == 1:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@_jit
def _attention_fwd_kernel(
    Q, K, V, TQ, TK, TV, O, TO,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    stqb, stqh, stqm, stqd,
    stkb, stkh, stkn, stkd,
    stvb, stvh, stvn, stvd,
    sob, soh, som, sod,
    stob, stoh, stom, stod,
    H, LQ, LK, HEAD_DIM, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WITH_JVP: tl.constexpr, COMPUTE_O: tl.constexpr, DOT_MODE: tl.constexpr,
):
    """One (BLOCK_M queries, batch*head) tile. qk_scale = scale * log2(e) (scores live in base 2),
    sm_scale = scale (the tangent of the scores is in natural units). COMPUTE_O=False (JVP only):
    O already holds the attention output (from the forward pass), which is read instead of
    accumulated, saving the P v product and one float32 tile."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: a (B, H) slice may hold more than 2^31 elements
    b = bh // H
    h = bh % H

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_mask = offs_m < LQ
    d_mask = offs_d < HEAD_DIM
    qd_mask = m_mask[:, None] & d_mask[None, :]

    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=qd_mask, other=0.0)
    if WITH_JVP:
        tq_ptrs = TQ + b * stqb + h * stqh + offs_m[:, None] * stqm + offs_d[None, :] * stqd
        tq = tl.load(tq_ptrs, mask=qd_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if COMPUTE_O:
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if WITH_JVP:
        c_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # B + T

    for start_n in range(0, LK, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < LK
        nd_mask = n_mask[:, None] & d_mask[None, :]
        k_ptrs = K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
        kt = tl.trans(tl.load(k_ptrs, mask=nd_mask, other=0.0))  # (BLOCK_D, BLOCK_N)
        v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd
        v = tl.load(v_ptrs, mask=nd_mask, other=0.0)

        s = _mma(q, kt, DOT_MODE)
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if COMPUTE_O:
            acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_MODE)

        if WITH_JVP:
            tk_ptrs = TK + b * stkb + h * stkh + offs_n[:, None] * stkn + offs_d[None, :] * stkd
            tkt = tl.trans(tl.load(tk_ptrs, mask=nd_mask, other=0.0))
            tv_ptrs = TV + b * stvb + h * stvh + offs_n[:, None] * stvn + offs_d[None, :] * stvd
            tv = tl.load(tv_ptrs, mask=nd_mask, other=0.0)
            ds = _mma(tq, kt, DOT_MODE) + _mma(q, tkt, DOT_MODE)
            # masked columns already have p == 0; zero dS there too so 0 * garbage stays 0
            ds = tl.where(n_mask[None, :], ds * sm_scale, 0.0)
            pds = p * ds
            c_i = c_i * alpha + tl.sum(pds, 1)
            acc_t = acc_t * alpha[:, None] + _mma(pds.to(v.dtype), v, DOT_MODE)
            acc_t += _mma(p.to(tv.dtype), tv, DOT_MODE)
        m_i = m_new

    inv_l = 1.0 / l_i
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    if COMPUTE_O:
        o = acc * inv_l[:, None]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=qd_mask)
    else:
        o = tl.load(o_ptrs, mask=qd_mask, other=0.0).to(tl.float32)
    if WITH_JVP:
        mu = c_i * inv_l
        to = acc_t * inv_l[:, None] - mu[:, None] * o
        to_ptrs = TO + b * stob + h * stoh + offs_m[:, None] * stom + offs_d[None, :] * stod
        tl.store(to_ptrs, to.to(TO.dtype.element_ty), mask=qd_mask)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _launch_config(block_d: int, device: torch.device, lq: int, lk: int, dtype: torch.dtype, with_jvp: bool,
                   compute_o: bool = True):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages).

    Interpreter: small tiles (it is numpy; small tiles also exercise the masking). GPUs: the largest
    tiles that ptxas compiled without register spills (or nearly) for sm_80 and sm_90, measured by
    compiling ahead of time with Triton 3.9 (no GPU was at hand to time them). The JVP kernel holds
    two float32 accumulators (one when o is given) and four score-sized tiles, so its tiles are smaller. float32 inputs
    (three TF32 products per dot) get small tiles and one stage.
    """
    if device.type != "cuda":
        block_m = 16 if lq <= 16 else 32
        block_n = 16 if lk <= 16 else 32
        return block_m, block_n, 4, 1
    if dtype == torch.float32:
        return (32, 32, 8, 1) if block_d <= 128 else (16, 32, 8, 1)
    hopper = _capability(device.index if device.index is not None else torch.cuda.current_device())[0] >= 9
    if block_d > 128:  # head dims 129..256 (SD1.x's 160, padded to 256): compiled ahead for sm_90, the JVP
        # tiles with the fewest spills found (ptxas: 352 bytes for the JVP, 32 given o; none for the forward)
        if not with_jvp:
            return 64, 32, 8, 2
        return 16, 16, 4, 1
    if not with_jvp:  # plain forward
        return (128, 64, 8, 2) if hopper or block_d <= 64 else (64, 64, 8, 2)
    if not compute_o:  # tangent given o: one float32 accumulator
        if block_d <= 64:
            return (128, 64, 8, 2) if hopper else (128, 32, 8, 2)
        return (128, 32, 8, 2) if hopper else (32, 64, 8, 2)
    if block_d <= 64:
        return (128, 64, 8, 2) if hopper else (64, 32, 8, 2)
    return (64, 32, 8, 2) if hopper else (32, 32, 8, 2)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when the kernel handles these inputs, else the reason it does not."""
    if q.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16, float32)"
    d, dv = q.shape[-1], v.shape[-1]
    if d != dv:
        return f"head dims of q/k ({d}) and v ({dv}) differ"
    if not (_MIN_HEAD_DIM <= d <= _MAX_HEAD_DIM):
        return f"head dim {d} (the kernel takes {_MIN_HEAD_DIM}..{_MAX_HEAD_DIM})"
    if not TRITON_AVAILABLE:
        return "triton is not installed"
    if q.device.type == "cpu" and not INTERPRETED:
        return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before triton is imported)"
    if q.device.type not in ("cuda", "cpu"):
        return f"device {q.device.type}"
    if q.device.type == "cuda" and q.dtype != torch.float16 and torch.cuda.get_device_capability(q.device) < (8, 0):
        return f"{q.dtype} dots need an Ampere or newer GPU (compute capability >= 8.0)"
    if k.shape[-2] == 0:
        return "no keys (Lk = 0)"
    return None


def _flash(q, k, v, tq, tk, tv, scale: float, with_jvp: bool, o=None):
    """Launch on (..., L, D) inputs. Returns o, or (o, to) with the JVP, or to alone when the
    attention output `o` is given."""
    reason = supports(q, k, v)
    if reason is not None:
        raise ValueError(f"the triton attention kernel does not support these inputs: {reason}")
    if q.dim() != 4:  # (..., L, D): fold the leading dims into the batch
        lead = q.shape[:-2]
        flat = [None if t is None else t.reshape(-1, 1, *t.shape[-2:]) for t in (q, k, v, tq, tk, tv, o)]
        out = _flash(*flat[:6], scale, with_jvp, o=flat[6])
        outs = out if isinstance(out, tuple) else (out,)
        outs = tuple(t.reshape(*lead, *t.shape[-2:]) for t in outs)
        return outs if isinstance(out, tuple) else outs[0]
    B, H, LQ, D = q.shape
    compute_o = o is None
    if compute_o:
        o = torch.empty_like(q)
    elif not with_jvp:
        raise ValueError("a given attention output only makes sense for the JVP")
    else:
        o = o.to(q.dtype)
    if with_jvp:
        tq, tk, tv = (t.to(q.dtype) for t in (tq, tk, tv))
        to = torch.empty_like(q)
    else:  # unused pointers: pass real tensors so the signature stays the same
        tq, tk, tv, to = q, k, v, o
    # the second grid axis (batch * heads) is limited to 65535 programs: launch batch slices
    step = max(1, _MAX_GRID_Y // H)
    for b0 in range(0, B, step):
        sl = slice(b0, b0 + step)
        _launch(q[sl], k[sl], v[sl], tq[sl], tk[sl], tv[sl], o[sl], to[sl], scale, with_jvp, compute_o)
    if not with_jvp:
        return o
    return (o, to) if compute_o else to


def _dot_mode(dtype: torch.dtype, device: torch.device) -> int:
    if dtype == torch.float32:
        return DOT_IEEE if device.type == "cpu" else DOT_TF32X3
    if dtype == torch.bfloat16 and INTERPRETED and device.type == "cpu":
        return DOT_UPCAST
    return DOT_NATIVE


# Tile candidates the autotuner times on a GPU, per (head-dim block, mode): (BLOCK_M, BLOCK_N, warps, stages).
# Each set starts with `_launch_config`'s fixed choice for sm_90 and adds neighbours (fewer warps, more stages,
# narrower blocks), which matter most at head dim 128, where the fixed tiles measured far slower than flash SDPA
# and every JVP tile spills some registers when compiled for sm_90 (16 to 240 bytes for these; candidates that
# spilled over 1 KB were dropped). Modes: "fwd" (plain forward), "jvp" (o and its tangent), "tan" (the tangent
# given o, what forward-mode AD runs after the forward).
TILE_CANDIDATES = {
    (64, "fwd"): ((128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)),
    (128, "fwd"): ((128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2)),
    (256, "fwd"): ((64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 4, 2)),
    (64, "jvp"): ((128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)),
    (128, "jvp"): ((64, 32, 8, 2), (32, 32, 8, 2), (64, 32, 4, 2), (128, 32, 8, 1), (32, 16, 4, 2), (16, 32, 4, 2)),
    (256, "jvp"): ((16, 16, 4, 1), (16, 32, 4, 1)),
    (64, "tan"): ((128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)),
    (128, "tan"): ((128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 3), (32, 64, 4, 2)),
    (256, "tan"): ((16, 16, 4, 1), (16, 32, 4, 1), (32, 32, 8, 1)),
}
# the autotuner's key: a new value of any of these (and of the tensors' dtypes) is timed again
AUTOTUNE_KEY = ["LQ", "LK", "HEAD_DIM", "BLOCK_D", "WITH_JVP", "COMPUTE_O", "DOT_MODE"]


def _mode(with_jvp: bool, compute_o: bool) -> str:
    return "fwd" if not with_jvp else ("jvp" if compute_o else "tan")


def tile_candidates(block_d: int, with_jvp: bool, compute_o: bool, dot_mode: int) -> list[tuple[int, int, int, int]]:
    """The tiles worth timing for one kernel variant (float32 dots get `_launch_config`'s small tiles only)."""
    if dot_mode in (DOT_IEEE, DOT_TF32X3):
        return [(32, 32, 8, 1)] if block_d <= 128 else [(16, 32, 8, 1)]
    width = 64 if block_d <= 64 else (128 if block_d <= 128 else 256)
    return list(TILE_CANDIDATES[(width, _mode(with_jvp, compute_o))])


def autotune_enabled() -> bool:
    """CUDA launches time the candidate tiles once per shape unless FEWSTEP_ATTENTION_AUTOTUNE=0 (then the fixed
    `_launch_config` tiles run, as in the interpreter)."""
    return os.environ.get("FEWSTEP_ATTENTION_AUTOTUNE", "1") != "0"


def _use_autotune(q: torch.Tensor) -> bool:
    return q.is_cuda and autotune_enabled()


def _prune(configs, named_args, **kwargs):
    """Keeps the configs of the call's variant (`tile_candidates`); every config of the union is a triton.Config
    whose kwargs hold BLOCK_M and BLOCK_N."""
    wanted = set(tile_candidates(kwargs["BLOCK_D"], kwargs["WITH_JVP"], kwargs["COMPUTE_O"], kwargs["DOT_MODE"]))
    return [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]


@functools.cache
def autotuned_kernel(do_bench=None):
    """`_attention_fwd_kernel` behind `triton.autotune` over every tile candidate, pruned per call to the
    variant's own (`do_bench`: the timer, Triton's own when None; the tests pass a stand-in)."""
    every = sorted({c for d in (16, 128, 256) for w in (False, True) for o in (False, True)
                    for m in (DOT_NATIVE, DOT_TF32X3) for c in tile_candidates(d, w, o, m)})
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in every]
    extra = {} if do_bench is None else {"do_bench": do_bench}
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune},
                           **extra)(_attention_fwd_kernel)


def _launch(q, k, v, tq, tk, tv, o, to, scale: float, with_jvp: bool, compute_o: bool, tuned=None):
    """One launch; `tuned` (an `autotuned_kernel`) times the candidate tiles, by default on CUDA when
    `autotune_enabled()`; otherwise `_launch_config`'s fixed tiles."""
    B, H, LQ, D = q.shape
    LK = k.shape[-2]
    block_d = max(16, triton.next_power_of_2(D))
    dot_mode = _dot_mode(q.dtype, q.device)
    log2e = 1.4426950408889634
    args = (q, k, v, tq, tk, tv, o, to,
            *q.stride(), *k.stride(), *v.stride(),
            *tq.stride(), *tk.stride(), *tv.stride(),
            *o.stride(), *to.stride(),
            H, LQ, LK, D, scale * log2e, scale)
    variant = {"BLOCK_D": block_d, "WITH_JVP": with_jvp, "COMPUTE_O": compute_o, "DOT_MODE": dot_mode}
    if tuned is None and _use_autotune(q):
        tuned = autotuned_kernel()
    if tuned is not None:
        tuned[lambda meta: (triton.cdiv(LQ, meta["BLOCK_M"]), B * H)](*args, **variant)
        return
    block_m, block_n, num_warps, num_stages = _launch_config(block_d, q.device, LQ, LK, q.dtype, with_jvp,
                                                             compute_o)
    _attention_fwd_kernel[(triton.cdiv(LQ, block_m), B * H)](
        *args, BLOCK_M=block_m, BLOCK_N=block_n, **variant, num_warps=num_warps, num_stages=num_stages)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """o = softmax(q k^T * scale) v with the Triton kernel; (B, H, L, D) inputs (or (..., L, D))."""
    return _flash(q, k, v, None, None, None, scale, with_jvp=False)


def flash_attention_jvp(q, k, v, tq, tk, tv, scale: float):
    """(o, to): attention and its tangent along (tq, tk, tv) from one fused Triton kernel."""
    return _flash(q, k, v, tq, tk, tv, scale, with_jvp=True)


def flash_attention_tangent(q, k, v, o, tq, tk, tv, scale: float):
    """to alone, given the attention output o (from the forward pass): the JVP kernel without the
    P v product (what forward-mode AD needs after the primal forward already ran)."""
    return _flash(q, k, v, tq, tk, tv, scale, with_jvp=True, o=o)
