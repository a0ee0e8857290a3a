"""Jacobian-vector products of networks, behind one function: `jvp(fn, primals, tangents, backend=...)`.

The directional derivative d/de fn(p + e v) at e = 0 (sCM's dF/dt, Lu & Song 2024), computed by:
- "kernel": forward-mode AD on dual tensors (torch.autograd.forward_ad, about half the overhead of
  torch.func's wrappers on CPU) with every diffusers attention layer attending through
  `fewstep_kernels.attention` (`fewstep_kernels.kernel_attention`: self, cross, SD3's joint and Flux's
  rotary attention, masks; an unknown attention processor is an error), whose jvp rule is the fused
  flash-attention forward+JVP Triton kernel for half-precision CUDA inputs (a chunked PyTorch reference
  elsewhere). The built-in UNet always attends through it.
- "func": torch.func.jvp with torch's scaled_dot_product_attention forced onto its MATH backend (the
  only one with a forward-mode rule).
- "fd": a central finite difference (fn(p + h v) - fn(p - h v)) / 2h, both sides run from the same
  torch RNG state (identical dropout masks); per-sample steps (h+, h-) allow one-sided differences
  near the ends of a time range.
- "auto": the first of kernel, func that runs on the model (tried once, then remembered), else fd with
  a one-line warning.
Both forward-AD backends make GroupNorm inputs contiguous (F.group_norm's forward AD fails on the
non-contiguous inputs diffusers' attention blocks give it) and keep every norm layer's output tangent in
its primal's dtype (on CUDA, torch's layer-norm rule returns a float32 tangent for bf16 input); none of
them builds an autograd graph. Every backend runs with autocast switched off: torch's forward AD mis-casts
tangents under autocast (conv -> group_norm -> conv fails: a bf16 tangent meets an fp32 primal). A
mixed-precision run asks for its half dtype instead (`dtype=`): the networks' parameters and the state
input are cast for the pass, so the JVP runs in bf16 through the fused kernel. Central differences stay
in the networks' own precision (in bf16 they would be mostly round-off).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwad
from torch import nn

from fewstep.errors import FewstepError

JVP_BACKENDS = ("auto", "kernel", "func", "fd")
FORWARD_AD_BACKENDS = ("kernel", "func")
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)


def default_fd_step(dtype: torch.dtype) -> float:
    """Central-difference step balancing truncation (h^2 times the third derivative, large for networks
    with 1000-scaled time embeddings) against round-off (machine eps / h)."""
    if dtype == torch.float64:
        return 1e-6
    if dtype == torch.float32:
        return 2e-4
    return 1e-2


@contextlib.contextmanager
def _hooked(modules: Sequence[nn.Module], wanted: Callable[[nn.Module], bool], register):
    """`register(m)` (a hook handle) on every module of `modules` that is `wanted`, once each, removed on exit."""
    handles, seen = [], set()
    try:
        for root in modules:
            for m in root.modules():
                if wanted(m) and id(m) not in seen:
                    seen.add(id(m))
                    handles.append(register(m))
        yield
    finally:
        for h in handles:
            h.remove()


def _tensor_slots(modules: Sequence[nn.Module]):
    """(store, name, tensor, kept) for every parameter and buffer of `modules`: the dict that holds it, its key there,
    and whether its module lies inside a `jvp_keep_dtype` module (left in its precision by a cast)."""
    kept = _kept_in_own_dtype(modules)
    for root in modules:
        for m in root.modules():
            for store in (m._parameters, m._buffers):
                for name, t in list(store.items()):
                    if t is not None:
                        yield store, name, t, id(m) in kept


def _kept_in_own_dtype(modules: Sequence[nn.Module]) -> set[int]:
    """ids of every module inside a `jvp_keep_dtype` module of `modules` (left in its precision by a bf16 pass)."""
    return {id(m) for root in modules for k in root.modules() if getattr(k, "jvp_keep_dtype", False)
            for m in k.modules()}


@contextlib.contextmanager
def contiguous_group_norm(modules: Sequence[nn.Module]):
    """Forward pre-hooks that make every GroupNorm input contiguous while the context is open."""

    def hook(_module, args):
        return (args[0].contiguous(), *args[1:])

    with _hooked(modules, lambda m: isinstance(m, nn.GroupNorm), lambda m: m.register_forward_pre_hook(hook)):
        yield


def expand_modules(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """`modules` plus the module trees they run without registering them: any module with a `jvp_modules()`
    method (a LoRA student's diffusers tree, which shares the teacher's tensors) adds what it returns."""
    out, seen, todo = [], set(), list(modules)
    while todo:
        root = todo.pop(0)
        if id(root) in seen:
            continue
        seen.add(id(root))
        out.append(root)
        for m in root.modules():
            extra = getattr(m, "jvp_modules", None)
            if callable(extra):
                todo.extend(extra())
    return out


def network_dtype(modules: Sequence[nn.Module], dtype: torch.dtype | None = None) -> torch.dtype | None:
    """The precision most of the networks' parameters (by count) run in for a pass with `jvp(..., dtype=dtype)`:
    cast ones in `dtype`, the rest (time embeddings kept in their own precision) as they are; with `dtype` None, the
    dtype most parameters have now (None without floating parameters)."""
    counts: dict[torch.dtype, int] = {}
    kept: set[int] = set()
    if dtype is not None:  # which parameters a cast would leave alone (no cast: every one counts as it is)
        kept_modules = _kept_in_own_dtype(modules)
        kept = {id(p) for root in modules for m in root.modules() if id(m) in kept_modules
                for p in m.parameters(recurse=False)}
    seen = set()
    for root in modules:
        for p in root.parameters():
            if id(p) in seen or not p.is_floating_point():
                continue
            seen.add(id(p))
            d = dtype if dtype is not None and id(p) not in kept else p.dtype
            counts[d] = counts.get(d, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, NORM_TYPES) or "Norm" in type(m).__name__


class _TangentInPrimalDtype(torch.autograd.Function):
    """The identity on values; its JVP casts the tangent to the primal's dtype. (The forward copies: a custom
    Function that returns a view must return a view of the tangent too, and a cast is not one.)"""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def jvp(ctx, t):
        return t.to(ctx.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _tangent_in_primal_dtype(out):
    """`out` (a tensor, or a tuple/list of them) with every dual tensor's tangent in its primal's dtype."""
    if isinstance(out, torch.Tensor):
        if out.is_floating_point():
            tangent = fwad.unpack_dual(out).tangent
            if tangent is not None and tangent.dtype != out.dtype:
                return _TangentInPrimalDtype.apply(out)
        return out
    if isinstance(out, (tuple, list)):
        fixed = [_tangent_in_primal_dtype(o) for o in out]
        return type(out)(fixed) if isinstance(out, list) or type(out) is tuple else type(out)(*fixed)
    return out


@contextlib.contextmanager
def tangents_in_primal_dtype(modules: Sequence[nn.Module]):
    """Forward hooks on every normalisation layer in `modules` (torch's norm classes, and any class with "Norm"
    in its name: diffusers' RMSNorm, AdaLayerNorm*, ...) that give the tangents of their outputs their primal's
    dtype while the context is open. On CUDA, torch's forward-AD rule for layer norm combines the tangent with
    the float32 statistics of a bf16/fp16 input and returns a float32 tangent for a half-precision output; the
    next Linear then fails on mixed dtypes. Norm layers are where torch keeps statistics in float32, so they are
    the layers hooked (they are few; a hook on every module would add Python work to thousands of layers)."""
    def hook(_module, _args, out):
        return _tangent_in_primal_dtype(out)

    with _hooked(modules, _is_norm, lambda m: m.register_forward_hook(hook)):
        yield


@contextlib.contextmanager
def networks_in_dtype(modules: Sequence[nn.Module], dtype: torch.dtype | None):
    """Every floating-point parameter and buffer of `modules` in `dtype` while the context is open (cast copies,
    one per tensor, however many modules share it; the originals come back afterwards). For no-grad passes such
    as sCM's JVP in the run's mixed precision: a student with float32 master weights runs in bf16 there. Modules
    with `jvp_keep_dtype = True` (the built-in nets' time embedding, fp32 by design) keep their precision. A
    trained fp32 network is cast on every call (its weights change every step; SDXL's UNet: a 5 GB copy)."""
    if dtype is None:
        yield
        return
    copies: dict[int, torch.Tensor] = {}
    saved = []
    try:
        for store, name, t, kept in list(_tensor_slots(modules)):
            if kept or not t.is_floating_point() or t.dtype == dtype:
                continue
            cast = copies.get(id(t))
            if cast is None:
                cast = copies[id(t)] = t.detach().to(dtype)
            saved.append((store, name, t))
            store[name] = cast
        yield
    finally:
        for store, name, t in reversed(saved):
            store[name] = t


@contextlib.contextmanager
def math_sdpa():
    """torch's scaled_dot_product_attention on its MATH backend (differentiable in forward mode)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def _forward_ad(fn, primals, tangents, backend: str, modules, dtype, attention: str):
    if dtype is not None:  # the state input runs in the networks' dtype; times and the rest keep theirs
        primals = (primals[0].to(dtype), *primals[1:])
        tangents = (tangents[0].to(dtype), *tangents[1:])
    modules = expand_modules(modules)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(networks_in_dtype(modules, dtype))
        stack.enter_context(contiguous_group_norm(modules))
        stack.enter_context(tangents_in_primal_dtype(modules))
        if backend == "func":
            stack.enter_context(math_sdpa())
            return torch.func.jvp(fn, tuple(primals), tuple(tangents))[1]
        from fewstep_kernels import kernel_attention

        stack.enter_context(kernel_attention(modules, attention))
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
        backend: str = "func", modules: Sequence[nn.Module] = (), fd_steps=None, dtype: torch.dtype | None = None,
        attention: str = "auto") -> torch.Tensor:
    """d/de fn(*(p + e v)) at e = 0 by one backend ("kernel", "func" or "fd"; see the module docstring).

    `modules`: the networks fn runs through (attention routing, the GroupNorm fix, tangent dtypes, `dtype`).
    `fd_steps`: (h_plus, h_minus), floats or per-sample (B,) tensors: fd evaluates fn at p + h_plus v and
    p - h_minus v and divides by h_plus + h_minus (default: both `default_fd_step` of the first primal's dtype).
    `dtype`: run the forward-AD backends in this precision (bf16 for a mixed-precision run): the floating
    parameters and buffers of `modules` (`networks_in_dtype`), and the first primal and tangent (the network's
    state input), are cast to it for the pass; the other primals (times) keep theirs. fd ignores it (central
    differences in bf16 are mostly round-off). `attention`: the attention backend of "kernel" ("auto": the Triton
    kernel for supported half-precision CUDA inputs; "strict": the same or an error; "triton": the kernel or an
    error; "reference": PyTorch). `modules` are expanded by `expand_modules` (LoRA students' diffusers trees).
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
        return _forward_ad(fn, primals, tangents, backend, modules, dtype, attention)


def _backend_errors() -> tuple[type[BaseException], ...]:
    """What a backend that cannot run on a model raises: torch's and Python's errors, and Triton's (compilation,
    out of resources), which derive from Exception only."""
    errors: tuple[type[BaseException], ...] = (NotImplementedError, RuntimeError, ValueError)
    try:
        from triton.errors import TritonError
    except ImportError:
        return errors
    return (*errors, TritonError)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class JVP:
    """A JVP backend choice that is resolved once: `JVP("auto")(fn, primals, tangents, modules=...)`.

    "auto" tries forward-mode AD through fewstep's attention kernels, then with math attention, and keeps
    the first that runs; a model without forward-mode support gets central differences and one warning.
    A backend asked for by name never falls back: if it fails, the call raises a one-line FewstepError, and
    "kernel" runs half-precision CUDA attention in the Triton kernel or fails (attention="strict"; masked
    attention is plain math attention, the kernel has no mask). Out-of-memory errors are raised as they are.
    After each call: `chosen` is the backend in use (None before the first call under "auto"), `attention`
    counts the attention paths the call took (triton, reference, masked; empty for func and fd), `dtype` is
    the precision most of the network's parameters ran in (`network_dtype`).
    """

    def __init__(self, backend: str = "auto", fd_step: float | None = None):
        if backend not in JVP_BACKENDS:
            raise ValueError(f"unknown JVP backend {backend!r}; allowed: {', '.join(JVP_BACKENDS)}")
        self.backend = backend
        self.fd_step = fd_step
        self.chosen: str | None = None if backend == "auto" else backend
        self.attention: dict[str, int] = {}
        self.dtype: torch.dtype | None = None

    def _steps(self, primals, fd_steps):
        if fd_steps is not None:
            return fd_steps
        h = self.fd_step if self.fd_step is not None else default_fd_step(primals[0].dtype)
        return (h, h)

    def _run(self, backend, fn, primals, tangents, modules, fd_steps, dtype):
        attention = "strict" if self.backend == "kernel" else "auto"
        steps = self._steps(primals, fd_steps) if backend == "fd" else None
        counts = contextlib.nullcontext({})
        if backend == "kernel":
            from fewstep_kernels import count_backends

            counts = count_backends()
        with counts as counted:
            out = jvp(fn, primals, tangents, backend=backend, modules=modules, fd_steps=steps,
                      dtype=None if backend == "fd" else dtype, attention=attention)
        self.attention = dict(counted)
        self.dtype = network_dtype(expand_modules(modules), None if backend == "fd" else dtype) or out.dtype
        return out

    def __call__(self, fn, primals, tangents, *, modules: Sequence[nn.Module] = (), fd_steps=None,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
        """`dtype`: the precision of the forward-AD pass (see `jvp`); None keeps the networks' own."""
        if self.chosen is not None:
            if self.backend == "auto" or self.chosen == "fd":
                return self._run(self.chosen, fn, primals, tangents, modules, fd_steps, dtype)
            try:
                return self._run(self.chosen, fn, primals, tangents, modules, fd_steps, dtype)
            except torch.OutOfMemoryError:
                raise
            except _backend_errors() as e:
                raise FewstepError(f"the {self.chosen} JVP backend (jvp={self.chosen}) failed on this model: "
                                   f"{_first_line(e)[:300]}; a backend asked for by name does not fall back "
                                   f"(jvp=auto tries kernel, func, then finite differences)") from e
        errors = []
        for backend in FORWARD_AD_BACKENDS:
            try:
                out = self._run(backend, fn, primals, tangents, modules, fd_steps, dtype)
            except torch.OutOfMemoryError:  # not a backend that cannot run here: the next one would not fit either
                raise
            except _backend_errors() as e:
                errors.append(f"{backend}: {_first_line(e)}")
                continue
            self.chosen = backend
            return out
        self.chosen = "fd"
        warnings.warn("forward-mode AD does not run through this model (" + "; ".join(errors)[:300]
                      + "); using central finite differences for JVPs", RuntimeWarning, stacklevel=2)
        return self._run("fd", fn, primals, tangents, modules, fd_steps, dtype)

    def describe(self) -> dict:
        """What ran: {"backend", "attention" (paths of the last call), "dtype"} (JSON-able, for logs)."""
        return {"backend": self.chosen, "attention": dict(self.attention),
                "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch.")}


def place_networks(modules: Sequence[nn.Module], *, device=None, dtype: torch.dtype | None = None) -> None:
    """Move `modules` (and the trees they run without registering them, `expand_modules`) to `device` and cast their
    floating tensors to `dtype`, in place: each tensor's `.data` is replaced, so a tensor shared by two trees (a LoRA
    student's base and its teacher's) moves once and stays shared. Modules marked `jvp_keep_dtype` (the built-in
    nets' time embedding, fp32 by design) keep their precision."""
    device = torch.device(device) if device is not None else None
    seen: set[int] = set()
    for _, _, t, kept in _tensor_slots(expand_modules(modules)):
        if id(t) in seen:
            continue
        seen.add(id(t))
        to_dtype = dtype if dtype is not None and not kept and t.is_floating_point() else t.dtype
        to_device = device if device is not None else t.device
        if t.dtype != to_dtype or t.device != to_device:
            t.data = t.data.to(device=to_device, dtype=to_dtype)
