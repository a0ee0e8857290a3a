"""Attention with a fused forward-mode JVP, and the dispatcher between the Triton kernel and PyTorch.

`attention(q, k, v)` is differentiable in both modes: `torch.func.jvp` and
`torch.autograd.forward_ad` call `FlashAttentionJVP.jvp` (the fused kernel on CUDA), and the
backward recomputes softmax block by block in PyTorch. The tangent is a stop-gradient: nothing
backpropagates through it (sCM/rCM use it only inside a detached target).

Backends: "triton" (the kernel; on CPU tensors it runs in Triton's interpreter, slowly, for tests),
"reference" (PyTorch, chunked over queries), "auto" (the kernel for float16/bfloat16 CUDA tensors it
supports when Triton is installed, the reference otherwise), "strict" (the kernel for float16/bfloat16 CUDA
tensors, a ValueError when it cannot take them; the reference for everything else). `use_backend(name)`
makes every `attention(..., backend="auto")` call inside it use `name` (how fewstep's JVP makes the built-in
UNet and routed diffusers layers follow `jvp=kernel`'s strictness).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import importlib.util

import torch

from fewstep_kernels.reference import (
    attention_backward_reference,
    attention_jvp_reference,
    attention_reference,
    check_shapes,
    default_scale,
)

BACKENDS = ("auto", "triton", "reference", "strict")
# float32 runs in the kernel only when asked for (backend="triton"): on GPUs its dots need three TF32
# products each and spill registers, while the chunked reference uses cuBLAS with bounded memory.
AUTO_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


_COUNTERS: list[collections.Counter] = []
_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("fewstep_attention_backend", default=None)


@contextlib.contextmanager
def use_backend(backend: str):
    """`attention(..., backend="auto")` resolves as `backend` while the context is open (in this thread)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    token = _FORCED.set(backend)
    try:
        yield
    finally:
        _FORCED.reset(token)


@contextlib.contextmanager
def count_backends():
    """A Counter of the attention paths taken while the context is open: "triton" and "reference" (one per
    `attention` call, by the backend it resolved to) and "masked" (`sdpa` calls with a mask, plain math)."""
    counter: collections.Counter = collections.Counter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def record_backend(name: str) -> None:
    for counter in _COUNTERS:
        counter[name] += 1


def _kernels():
    """The Triton module, imported on first use (importing triton costs about a second)."""
    from fewstep_kernels import flash_attention

    return flash_attention


def resolve_backend(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """"triton" or "reference" for these inputs; "auto" picks the kernel only for supported half-precision
    CUDA inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto" and _FORCED.get() is not None:
        backend = _FORCED.get()
    if backend == "strict":
        if not (q.is_cuda and q.dtype in AUTO_KERNEL_DTYPES):
            return "reference"
        if not TRITON_AVAILABLE:
            raise ValueError("strict attention needs the Triton kernel for half-precision CUDA inputs: triton is "
                             "not installed")
        backend = "triton"
    if backend == "auto":
        if q.is_cuda and q.dtype in AUTO_KERNEL_DTYPES and TRITON_AVAILABLE and _kernels().supports(q, k, v) is None:
            return "triton"
        return "reference"
    if backend == "triton":
        reason = _kernels().supports(q, k, v)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run these inputs: {reason}")
    return backend


# The kernel calls are torch custom ops so that torch.func sees opaque ops: inside a jvp rule it
# unwraps its tensors before calling them, and vmap folds batch dims into the kernel's batch.
@torch.library.custom_op("fewstep_kernels::flash_attention", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return _kernels().flash_attention(q, k, v, scale)


@_flash_attention_op.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q)


@torch.library.custom_op("fewstep_kernels::flash_attention_jvp", mutates_args=())
def _flash_attention_jvp_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor, tk: torch.Tensor,
                            tv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().flash_attention_jvp(q, k, v, tq, tk, tv, scale)


@_flash_attention_jvp_op.register_fake
def _(q, k, v, tq, tk, tv, scale):
    return torch.empty_like(q), torch.empty_like(q)


@torch.library.custom_op("fewstep_kernels::flash_attention_tangent", mutates_args=())
def _flash_attention_tangent_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, tq: torch.Tensor,
                                tk: torch.Tensor, tv: torch.Tensor, scale: float) -> torch.Tensor:
    return _kernels().flash_attention_tangent(q, k, v, o, tq, tk, tv, scale)


@_flash_attention_tangent_op.register_fake
def _(q, k, v, o, tq, tk, tv, scale):
    return torch.empty_like(q)


def _batch_first(tensors, in_dims, size):
    """Move each vmapped dim to the front (expanding unbatched inputs) so the kernel sees one more
    leading dim."""
    out = []
    for t, d in zip(tensors, in_dims, strict=True):
        out.append(t.unsqueeze(0).expand(size, *t.shape) if d is None else t.movedim(d, 0))
    return out


@_flash_attention_op.register_vmap
def _(info, in_dims, q, k, v, scale):
    q, k, v = _batch_first((q, k, v), in_dims[:3], info.batch_size)
    return _flash_attention_op(q, k, v, scale), 0


@_flash_attention_jvp_op.register_vmap
def _(info, in_dims, q, k, v, tq, tk, tv, scale):
    ts = _batch_first((q, k, v, tq, tk, tv), in_dims[:6], info.batch_size)
    return _flash_attention_jvp_op(*ts, scale), (0, 0)


@_flash_attention_tangent_op.register_vmap
def _(info, in_dims, q, k, v, o, tq, tk, tv, scale):
    ts = _batch_first((q, k, v, o, tq, tk, tv), in_dims[:7], info.batch_size)
    return _flash_attention_tangent_op(*ts, scale), 0


def _forward(q, k, v, scale, backend):
    if backend == "triton":
        return _flash_attention_op(q, k, v, scale)
    return attention_reference(q, k, v, scale)


def _jvp(q, k, v, tq, tk, tv, scale, backend):
    if backend == "triton":
        return _flash_attention_jvp_op(q, k, v, tq, tk, tv, scale)
    return attention_jvp_reference(q, k, v, tq, tk, tv, scale)


def _tangent(q, k, v, o, tq, tk, tv, scale, backend):
    """to alone; the kernel reads the forward's o instead of recomputing P v."""
    if backend == "triton":
        return _flash_attention_tangent_op(q, k, v, o, tq, tk, tv, scale)
    return attention_jvp_reference(q, k, v, tq, tk, tv, scale)[1]


def _zeros_if_none(t, like):
    return torch.zeros_like(like) if t is None else t


class FlashAttentionJVP(torch.autograd.Function):
    """o = softmax(q k^T * scale) v with a fused JVP rule and a recomputing backward.

    Forward-mode AD (torch.func.jvp, forward_ad.dual_level) runs the forward, then one fused pass
    that gives the tangent from q, k, v, the tangents and the forward's o; `generate_vmap_rule`
    lets torch.func.vmap see through it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, scale, backend):
        with torch.no_grad():
            return _forward(q, k, v, scale, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, backend = inputs
        ctx.scale = scale
        ctx.backend = backend
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v, output)

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tscale, _tbackend):
        q, k, v, o = ctx.saved_tensors
        # tangents in their primal's dtype (a float32 tangent for bf16 q would make the reference path's
        # output, and every layer after it, float32)
        tq, tk, tv = (_zeros_if_none(t, x).to(x.dtype) for t, x in ((tq, q), (tk, k), (tv, v)))
        with torch.no_grad():
            return _tangent(q, k, v, o, tq, tk, tv, ctx.scale, ctx.backend)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward (e.g. an R1 penalty) raises, not silently 0
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        with torch.no_grad():
            dq, dk, dv = attention_backward_reference(q, k, v, grad_out, ctx.scale)
        return dq, dk, dv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T * scale) v for (B, H, Lq, D) q and (B, H, Lk, D) k, v; scale defaults to 1/sqrt(D).

    Same result as `F.scaled_dot_product_attention(q, k, v, scale=scale)` (no mask, no dropout), but
    forward-mode AD works on every device and uses the fused kernel on CUDA.
    """
    check_shapes(q, k, v)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    resolved = resolve_backend(backend, q, k, v)
    if _COUNTERS:
        record_backend(resolved)
    return FlashAttentionJVP.apply(q, k, v, scale, resolved)


def attention_jvp(q, k, v, tq, tk, tv, scale: float | None = None, backend: str = "auto"):
    """(o, to): attention and its directional derivative along (tq, tk, tv) in one pass.

    to = dP v + P tv with dP = P * (dS - rowsum(P * dS)), dS = (tq k^T + q tk^T) * scale. Neither
    output carries an autograd graph.
    """
    check_shapes(q, k, v)
    for name, t, x in (("tq", tq, q), ("tk", tk, k), ("tv", tv, v)):
        if t.shape != x.shape:
            raise ValueError(f"tangent {name} has shape {tuple(t.shape)}, expected {tuple(x.shape)}")
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    with torch.no_grad():
        return _jvp(q, k, v, tq, tk, tv, scale, resolve_backend(backend, q, k, v))
