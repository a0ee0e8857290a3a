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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
        from fewstep.diffusion.processes import to_device

        z = torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)
        return to_device(z, self.device, like.dtype if like is not None else torch.float32)

    def rand(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, dtype=torch.float64)

    def randint(self, low: int, high: int, n: int) -> torch.Tensor:
        return torch.randint(low, high, (n,), generator=self.generator)


def _no_op(*args, **kwargs) -> None:
    return None


@dataclass
class RunContext:
    """What `DistillMethod.prepare` sees (the trainer builds it before each iteration).

    out: the run directory (a method keeps its own files under it, e.g. reflow's RUN/pairs/); iteration: the
    iteration about to run (== total once training has finished); total: the run's iterations; rank/world and
    barrier(): the process group (every rank calls prepare); sampling_model(): the student as it is sampled now
    (its EMA when the run keeps one); log(record): append a line to log.jsonl (main process only);
    status(text): a short progress note (the CLI shows it beside the progress bar).
    """

    out: Path
    iteration: int
    total: int
    device: torch.device
    rank: int = 0
    world: int = 1
    sampling_model: Callable | None = None
    barrier: Callable[[], None] = field(default=_no_op)
    log: Callable[[dict], None] = field(default=_no_op)
    status: Callable[[str], None] = field(default=_no_op)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class MethodConfig:
    """Base class of per-method hyperparameters (each method subclasses it with its own fields)."""


class DistillMethod:
    """Subclass, set `name`, `config_class`, and implement `networks`, `phases` and `loss`."""

    name: str = ""
    config_class: type = MethodConfig
    needs_data: bool = False  # the batch carries real data x0 (CD) or only conditions (DMD, TDM)
    description: str = ""
    # run defaults per kind of teacher data ("2d", "image", "text2image"; `fewstep.teachers.data_kind`):
    # DistillConfig fields (iters, batch_size, lr, ...) and "options" (this method's own), tuned on the built-in
    # teachers; `fewstep.training.config.resolve` takes from them what the user left out. Give every registered
    # class its own (a subclass that says nothing inherits its parent's).
    recipes: dict[str, dict] = {}
    # `fewstep distill` flags that set one of this method's options, name -> help (sCM's --mode); the same as
    # --opt NAME=VALUE
    cli_options: dict[str, str] = {}

    def __init__(self, teacher, config: MethodConfig | None = None, *, guidance: float = 1.0):
        self.teacher = teacher
        self.config = config if config is not None else self.config_class()
        self.guidance = float(guidance)
        # how students and fake scores are derived from a diffusers teacher (set by the trainer from the run's
        # --lora-rank, --lora-alpha, --gradient-checkpointing; see `student_from_teacher`)
        self.student_options: dict = {}

    # -- to implement -------------------------------------------------------------------------
    def networks(self) -> dict[str, Role]:  # pragma: no cover - abstract
        raise NotImplementedError

    def phases(self) -> list[Phase]:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, phase: str, batch: Batch, nets: dict[str, nn.Module], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Named losses; "loss" is the one back-propagated for the phase's roles."""
        raise NotImplementedError  # pragma: no cover - abstract

    def eval_steps(self) -> tuple[int, ...]:
        """The student step counts of the final quality table when --eval-steps is not given."""
        return (1, 2, 4)

    def student_meta(self) -> dict:
        """How the saved student samples by default (solver, steps, renoise, guidance)."""
        return {"default_solver": "fewstep", "default_steps": 1, "default_renoise": "fresh"}

    # -- optional hooks (methods that make their own training data or train in stages) -------------
    def prepare(self, run: RunContext) -> None:
        """Called by the trainer before every iteration and once after the last (run.iteration == run.total).

        Methods that train on data they make themselves (reflow's teacher pairs), or in stages, make or load it
        here, keeping files under run.out so a resumed run finds them; return at once when nothing changes.
        Randomness here must not come from ctx.generator or the global RNG (a resumed run would diverge).
        """

    def state_dict(self) -> dict:
        """The method's own JSON-able progress (e.g. its current stage), saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (called on resume, before `prepare`)."""

    def metrics(self) -> dict:
        """Extra JSON-able entries for metrics.json and the run's result (e.g. reflow's straightness)."""
        return {}

    # -- helpers ------------------------------------------------------------------------------
    def student_from_teacher(self, **network_overrides):
        """A trainable copy of the teacher (same network, process, prediction), optionally with extra
        network inputs (e.g. guidance_embed=True); new parameters keep their own initialisation.

        Networks that derive their own students (diffusers teachers: `DiffusersNet.derive`) give a LoRA
        adapter on the teacher's shared weights (`student_options["lora_rank"]`) or a full copy; call this
        once per network a method trains (student, fake score): each gets its own adapter or copy.
        """
        from fewstep.models.denoiser import Denoiser
        from fewstep.models.networks import build_network

        t = self.teacher
        if hasattr(t.net, "derive"):
            net = t.net.derive(**{**self.student_options, **network_overrides})
        elif self.student_options.get("lora_rank"):
            raise FewstepError("--lora-rank needs a diffusers teacher (sd15, sdxl, sd3, flux-dev, a hub id or pipeline "
                              "folder)")
        elif not network_overrides:
            net = copy.deepcopy(t.net)
        else:
            if not hasattr(t.net, "config"):
                raise FewstepError(f"method {self.name!r} needs a built-in network family for {network_overrides}")
            net = build_network({**t.net.config(), **network_overrides})
            missing, unexpected = net.load_state_dict(t.net.state_dict(), strict=False)
            if unexpected:
                raise FewstepError(f"teacher weights do not fit the student network: {unexpected[:3]}")
            net.to(next(t.net.parameters()).device)
        # the teacher's default guidance scale (FLUX.1-dev's 3.5, an LCM student's w) is not the student's: a student
        # samples with what its method fed it in training (`student_meta`'s default_guidance, else 1)
        meta = {k: v for k, v in t.meta.items() if k != "default_guidance"}
        student = Denoiser(net, t.process, t.prediction, cond_kind=t.cond_kind, num_classes=t.num_classes,
                           null_cond=t._null_cond, sigma_d=t.sigma_d, data_shape=t.data_shape,
                           meta=meta, boundary=t.boundary)
        student.components = t.components
        return student.requires_grad_(True).train()
