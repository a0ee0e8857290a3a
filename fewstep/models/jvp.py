"""Jacobian-vector products of networks, behind one function: `jvp(fn, primals, tangents, backend=...)`.

The directional derivative d/de fn(p + e v) at e = 0 (sCM's dF/dt, Lu & Song 2024), computed by:
- "kernel": forward-mode AD on dual tensors (torch.autograd.forward_ad, about half the overhead of
  torch.func's wrappers on CPU) with every diffusers attention layer temporarily routed through
  `fewstep_kernels.attention`, whose jvp rule is the fused flash-attention forward+JVP Triton kernel for
  half-precision CUDA inputs (a chunked PyTorch reference elsewhere). The built-in UNet always attends
  through it.
- "func": torch.func.jvp with torch's scaled_dot_product_attention forced onto its MATH backend (the
  only one with a forward-mode rule) and GroupNorm inputs made contiguous (F.group_norm's forward AD
  fails on the non-contiguous inputs diffusers' attention blocks give it).
- "fd": a central finite difference (fn(p + h v) - fn(p - h v)) / 2h, both sides run from the same
  torch RNG state (identical dropout masks); per-sample steps (h+, h-) allow one-sided differences
  near the ends of a time range.
- "auto": the first of kernel, func that runs on the model (tried once, then remembered), else fd with
  a one-line warning.
Both forward-AD backends also apply the GroupNorm fix; none of them builds an autograd graph. Every backend
runs with autocast switched off, in the precision of the inputs and parameters: torch's forward AD mis-casts
tangents under autocast (conv -> group_norm -> conv fails: a bf16 tangent meets an fp32 primal), and central
differences in bf16 would be mostly round-off. A half-precision model still gets the fused attention kernel.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

JVP_BACKENDS = ("auto", "kernel", "func", "fd")
FORWARD_AD_BACKENDS = ("kernel", "func")


def default_fd_step(dtype: torch.dtype) -> float:
    """Central-difference step balancing truncation (h^2 times the third derivative, large for networks
    with 1000-scaled time embeddings) against round-off (machine eps / h)."""
    if dtype == torch.float64:
        return 1e-6
    if dtype == torch.float32:
        return 2e-4
    return 1e-2


@contextlib.contextmanager
def contiguous_group_norm(modules: Sequence[nn.Module]):
    """Forward pre-hooks that make every GroupNorm input contiguous while the context is open."""
    handles = []

    def hook(_module, args):
        return (args[0].contiguous(), *args[1:])

    seen = set()
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.GroupNorm) and id(m) not in seen:
                seen.add(id(m))
                handles.append(m.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _attention_layers(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """Every diffusers attention layer (a module with a swappable `processor`) inside `modules`."""
    found, seen = [], set()
    for root in modules:
        for m in root.modules():
            if hasattr(m, "set_processor") and hasattr(m, "processor") and id(m) not in seen:
                seen.add(id(m))
                found.append(m)
    return found


@contextlib.contextmanager
def fewstep_attention(modules: Sequence[nn.Module]):
    """Route every diffusers attention layer in `modules` through fewstep_kernels.attention (their own
    processors come back when the context closes). Layers of attention classes the fewstep processor
    does not support raise ValueError."""
    layers = _attention_layers(modules)
    if not layers:
        yield
        return
    from diffusers.models.attention_processor import Attention
    from fewstep_kernels import FewstepJVPAttnProcessor

    other = sorted({type(m).__name__ for m in layers if not isinstance(m, Attention)})
    if other:
        raise ValueError(f"fewstep's attention kernel supports diffusers' Attention layers only, not "
                         f"{', '.join(other)}")
    saved = [(m, m.processor) for m in layers]
    processor = FewstepJVPAttnProcessor()
    try:
        for m in layers:
            m.set_processor(processor)
        yield
    finally:
        for m, proc in saved:
            m.set_processor(proc)


@contextlib.contextmanager
def math_sdpa():
    """torch's scaled_dot_product_attention on its MATH backend (differentiable in forward mode)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def _forward_ad(fn, primals, tangents, backend: str, modules):
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(contiguous_group_norm(modules))
        if backend == "func":
            stack.enter_context(math_sdpa())
            return torch.func.jvp(fn, tuple(primals), tuple(tangents))[1]
        import torch.autograd.forward_ad as fwad

        stack.enter_context(fewstep_attention(modules))
        stack.enter_context(fwad.dual_level())
        out = fn(*(fwad.make_dual(p, v) for p, v in zip(primals, tangents, strict=True)))
        tangent = fwad.unpack_dual(out).tangent
        return torch.zeros_like(out) if tangent is None else tangent.clone()


def _per_sample(h, like: torch.Tensor) -> torch.Tensor:
    """A step (float or (B,) tensor) shaped to broadcast against `like` (B, ...), in float64."""
    h = torch.as_tensor(h, dtype=torch.float64, device=like.device)
    return h.reshape(h.shape + (1,) * (like.ndim - h.ndim)) if h.ndim else h


def _finite_difference(fn, primals, tangents, steps, devices):
    h_plus, h_minus = steps
    side = []
    for sign, h in ((1.0, h_plus), (-1.0, h_minus)):
        moved = [(p.to(torch.float64) + sign * _per_sample(h, p) * v.to(torch.float64)).to(p.dtype)
                 if p.is_floating_point() else p for p, v in zip(primals, tangents, strict=True)]
        with torch.random.fork_rng(devices=devices), torch.no_grad():  # both sides from the same RNG state
            side.append(fn(*moved))
    ref = primals[0]
    span = _per_sample(torch.as_tensor(h_plus, dtype=torch.float64) + torch.as_tensor(h_minus, dtype=torch.float64),
                       side[0])
    work = torch.promote_types(side[0].dtype, torch.float32)
    return ((side[0].to(work) - side[1].to(work)) / span.to(work)).to(torch.promote_types(ref.dtype, side[0].dtype))


def jvp(fn: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor], *,
        backend: str = "func", modules: Sequence[nn.Module] = (), fd_steps=None) -> torch.Tensor:
    """d/de fn(*(p + e v)) at e = 0 by one backend ("kernel", "func" or "fd"; see the module docstring).

    `modules`: the networks fn runs through (for the attention routing and the GroupNorm fix).
    `fd_steps`: (h_plus, h_minus), floats or per-sample (B,) tensors: fd evaluates fn at p + h_plus v and
    p - h_minus v and divides by h_plus + h_minus (default: both `default_fd_step` of the first primal's dtype).
    """
    if backend not in JVP_BACKENDS or backend == "auto":
        raise ValueError(f"unknown JVP backend {backend!r}; allowed here: kernel, func, fd (auto: use JVP)")
    device = primals[0].device
    with torch.autocast(device_type=device.type, enabled=False):
        if backend == "fd":
            if fd_steps is None:
                h = default_fd_step(primals[0].dtype)
                fd_steps = (h, h)
            return _finite_difference(fn, primals, tangents, fd_steps, [device] if device.type == "cuda" else [])
        return _forward_ad(fn, primals, tangents, backend, modules)


class JVP:
    """A JVP backend choice that is resolved once: `JVP("auto")(fn, primals, tangents, modules=...)`.

    "auto" tries forward-mode AD through fewstep's attention kernels, then with math attention, and keeps
    the first that runs; a model without forward-mode support gets central differences and one warning.
    `chosen` is the backend in use (None before the first call under "auto").
    """

    def __init__(self, backend: str = "auto", fd_step: float | None = None):
        if backend not in JVP_BACKENDS:
            raise ValueError(f"unknown JVP backend {backend!r}; allowed: {', '.join(JVP_BACKENDS)}")
        self.backend = backend
        self.fd_step = fd_step
        self.chosen: str | None = None if backend == "auto" else backend

    def _steps(self, primals, fd_steps):
        if fd_steps is not None:
            return fd_steps
        h = self.fd_step if self.fd_step is not None else default_fd_step(primals[0].dtype)
        return (h, h)

    def __call__(self, fn, primals, tangents, *, modules: Sequence[nn.Module] = (), fd_steps=None) -> torch.Tensor:
        if self.chosen is not None:
            steps = self._steps(primals, fd_steps) if self.chosen == "fd" else None
            return jvp(fn, primals, tangents, backend=self.chosen, modules=modules, fd_steps=steps)
        errors = []
        for backend in FORWARD_AD_BACKENDS:
            try:
                out = jvp(fn, primals, tangents, backend=backend, modules=modules)
            except (NotImplementedError, RuntimeError, ValueError) as e:
                errors.append(f"{backend}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            self.chosen = backend
            return out
        self.chosen = "fd"
        warnings.warn("forward-mode AD does not run through this model (" + "; ".join(errors)[:300]
                      + "); using central finite differences for JVPs", RuntimeWarning, stacklevel=2)
        return jvp(fn, primals, tangents, backend="fd", modules=modules, fd_steps=self._steps(primals, fd_steps))
