"""The interface every distillation method implements; the trainer owns everything else.

A method names its networks by role (``student``, a frozen ``teacher``, a ``fake_score``, a
``discriminator``, an EMA ``target``...), gives each trained role its optimizer settings, and
splits an iteration into phases: each phase trains some roles, runs every ``every`` iterations
(DMD2's 5 critic steps per generator step is a critic phase every iteration and a generator phase
every 5th), and its loss is computed by ``method.loss(phase, batch, nets, ctx)``. Learning-rate
ratios (TDM) are per-role ``lr_scale``. Methods draw every random number from ``ctx.generator`` so a
resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from fewstep.errors import FewstepError


@dataclass
class Role:
    """A network a method needs.

    trainable: gets an optimizer (AdamW with lr = run lr * lr_scale, `betas`, `weight_decay`) and is
    wrapped by accelerate (DDP/FSDP). ema_of: a frozen copy updated after each step as an EMA of that
    role with `ema_decay` (CD's target network). Neither: frozen (the teacher), run under no_grad.
    """

    module: nn.Module
    trainable: bool = False
    lr_scale: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    ema_of: str | None = None
    ema_decay: float = 0.95


@dataclass
class Phase:
    """One optimisation phase of an iteration: the roles it trains, run when iteration % every == 0."""

    name: str
    trains: tuple[str, ...]
    every: int = 1


@dataclass
class Batch:
    """What the trainer hands a method each micro-step: `size` items, real data `x0` (only for methods
    with needs_data), conditions `cond` (class labels, or None for unconditional teachers)."""

    size: int
    cond: object = None
    x0: torch.Tensor | None = None


@dataclass
class StepContext:
    """Per-call state: the iteration, the device and the run's random generator (CPU)."""

    iteration: int
    generator: torch.Generator
    device: torch.device

    def randn(self, shape, like: torch.Tensor | None = None) -> torch.Tensor:
        z = torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)
        return z.to(self.device, like.dtype if like is not None else torch.float32)

    def rand(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, dtype=torch.float64)

    def randint(self, low: int, high: int, n: int) -> torch.Tensor:
        return torch.randint(low, high, (n,), generator=self.generator)


@dataclass
class MethodConfig:
    """Base class of per-method hyperparameters (each method subclasses it with its own fields)."""


class DistillMethod:
    """Subclass, set `name`, `config_class`, and implement `networks`, `phases` and `loss`."""

    name: str = ""
    config_class: type = MethodConfig
    needs_data: bool = False  # the batch carries real data x0 (CD) or only conditions (DMD, TDM)
    description: str = ""

    def __init__(self, teacher, config: MethodConfig | None = None, *, guidance: float = 1.0):
        self.teacher = teacher
        self.config = config if config is not None else self.config_class()
        self.guidance = float(guidance)

    # -- to implement -------------------------------------------------------------------------
    def networks(self) -> dict[str, Role]:  # pragma: no cover - abstract
        raise NotImplementedError

    def phases(self) -> list[Phase]:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, phase: str, batch: Batch, nets: dict[str, nn.Module], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Named losses; "loss" is the one back-propagated for the phase's roles."""
        raise NotImplementedError  # pragma: no cover - abstract

    def student_meta(self) -> dict:
        """How the saved student samples by default (solver, steps, renoise, guidance)."""
        return {"default_solver": "fewstep", "default_steps": 1, "default_renoise": "fresh"}

    # -- helpers ------------------------------------------------------------------------------
    def student_from_teacher(self, **network_overrides):
        """A trainable copy of the teacher (same network, process, prediction), optionally with extra
        network inputs (e.g. guidance_embed=True); new parameters keep their own initialisation."""
        from fewstep.models.denoiser import Denoiser
        from fewstep.models.networks import build_network

        t = self.teacher
        if not network_overrides:
            net = copy.deepcopy(t.net)
        else:
            if not hasattr(t.net, "config"):
                raise FewstepError(f"method {self.name!r} needs a built-in network family for {network_overrides}")
            net = build_network({**t.net.config(), **network_overrides})
            missing, unexpected = net.load_state_dict(t.net.state_dict(), strict=False)
            if unexpected:
                raise FewstepError(f"teacher weights do not fit the student network: {unexpected[:3]}")
            net.to(next(t.net.parameters()).device)
        student = Denoiser(net, t.process, t.prediction, cond_kind=t.cond_kind, num_classes=t.num_classes,
                           null_cond=t._null_cond, sigma_d=t.sigma_d, data_shape=t.data_shape,
                           meta=dict(t.meta), boundary=t.boundary)
        return student.requires_grad_(True).train()


_REGISTRY: dict[str, type[DistillMethod]] = {}


def register_method(name: str):
    """Class decorator: make a method available as `fewstep distill --method NAME`."""

    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[DistillMethod]:
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise FewstepError(f"unknown method {name!r}; allowed: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _load_builtin_methods():
    import fewstep.methods.consistency  # noqa: F401  (registers cd, lcm)
    import fewstep.methods.scm  # noqa: F401  (registers scm)


def build_method_config(name: str, values: dict | None) -> MethodConfig:
    """The method's config dataclass from a dict; unknown keys are a one-line error."""
    cls = get_method(name).config_class
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    bad = sorted(set(values) - set(known))
    if bad:
        raise FewstepError(f"unknown option(s) {', '.join(bad)} for method {name!r}; allowed: "
                           f"{', '.join(known) or 'none'}")
    return cls(**values)


