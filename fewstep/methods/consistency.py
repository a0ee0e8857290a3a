"""Consistency distillation: CD (Song et al. 2023) and LCM (Luo et al. 2023).

On a grid t_0 > t_1 > ... > t_{N-1} > clean of the teacher's times, pick j and the pair
(t_j, t_{j+k}); noise real data to x_{t_j}, take one teacher ODE step (Euler = DDIM, Heun, or
DPM-Solver++) to x_{t_{j+k}} with the shared sampler engine, and regress the student's x0 at
x_{t_j} onto the target network's x0 at x_{t_{j+k}} (a clean endpoint is its own target):
    loss = d(f_theta(x_{t_j}, t_j), sg f_target(x_{t_{j+k}}, t_{j+k})),
d = L2 or pseudo-Huber sqrt(|a - b|^2 + c^2) - c. The target is an EMA of the student (0.95) or the
student itself (iCT-style). The boundary condition f(x, clean) = x holds exactly for flow/EDM teachers
through x0 = x_t - t v (resp. the EDM preconditioning) and through LCM's c_skip/c_out otherwise.
LCM: k = 20 on a 1000-step grid, DDIM steps, and for conditional teachers the CFG scale
w ~ U[w_min, w_max] both guides the teacher step and is fed to the student as an input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fewstep.diffusion.processes import EDM, VPDiscrete
from fewstep.diffusion.timesteps import SPACINGS, sampling_timesteps
from fewstep.errors import FewstepError, check_choice
from fewstep.methods.base import Batch, DistillMethod, MethodConfig, Phase, Role, StepContext
from fewstep.methods.registry import register_method
from fewstep.sampling.solvers import ODE_SOLVERS, ode_solve

LOSSES = ("l2", "huber")
TARGETS = ("ema", "student")
BOUNDARIES = ("auto", "none", "lcm")


@dataclass
class ConsistencyConfig(MethodConfig):
    num_timesteps: int = 18  # N: noisy grid times, then clean data (Song et al.: 18)
    spacing: str = "auto"  # grid spacing: auto (karras for EDM, trailing integers for VP, else uniform) | SPACINGS
    skip: int = 1  # k: one teacher step spans k grid intervals
    solver: str = "heun"  # teacher ODE step: euler (DDIM) | heun | dpm++2m
    loss: str = "huber"  # l2 | huber
    huber_c: float | None = None  # pseudo-Huber c; None: 0.00054 sqrt(data dim) (Song & Dhariwal 2023)
    huber_elementwise: bool = False  # per element, averaged (LCM's code) instead of over the whole sample
    target: str = "ema"  # ema (target network = EMA of the student) | student (sg of the student itself)
    target_decay: float = 0.95
    guidance_min: float = 1.0  # CFG scale range for conditional teachers when guidance_embed (LCM): w ~ U[min, max]
    guidance_max: float = 1.0  # guides the teacher step and is a student input; else the run's --guidance is used
    guidance_embed: bool = False
    boundary: str = "auto"  # auto (lcm for VP teachers, else none) | none | lcm


@dataclass
class LCMConfig(ConsistencyConfig):
    num_timesteps: int = 1000
    skip: int = 20
    solver: str = "euler"
    huber_c: float | None = 1e-3
    huber_elementwise: bool = True
    # LCM trains SD with w in [3, 15]; the built-in class-conditional digits teacher is best near w = 1, so the
    # default range is [1, 3] (set guidance_min/guidance_max for text-to-image teachers)
    guidance_min: float = 1.0
    guidance_max: float = 3.0
    guidance_embed: bool = True


@register_method("cd")
class ConsistencyDistillation(DistillMethod):
    config_class = ConsistencyConfig
    needs_data = True
    description = "consistency distillation (Song et al. 2023): teacher ODE step, EMA target"
    recipes = {
        "2d": {"iters": 1000, "batch_size": 256, "lr": 1e-3, "ema_decay": 0.995, "options": {"num_timesteps": 40}},
        "image": {"iters": 1500, "batch_size": 128, "lr": 5e-4, "ema_decay": 0.999},
        # diffusers text-to-image teachers: starting points from the papers (LCM-LoRA: rank 64, lr 1e-4)
        "text2image": {"iters": 1000, "batch_size": 8, "lr": 1e-4, "ema_decay": 0.999, "lora_rank": 64},
    }

    def __init__(self, teacher, config=None, *, guidance: float = 1.0):
        super().__init__(teacher, config, guidance=guidance)
        c = self.config
        check_choice("solver", c.solver, ODE_SOLVERS)
        check_choice("loss", c.loss, LOSSES)
        check_choice("target", c.target, TARGETS)
        check_choice("spacing", c.spacing, ("auto", *SPACINGS))
        check_choice("boundary", c.boundary, BOUNDARIES)
        if c.num_timesteps < 1 or not 1 <= c.skip <= c.num_timesteps:
            raise FewstepError(f"need num_timesteps >= 1 and 1 <= skip <= num_timesteps, got "
                               f"{c.num_timesteps} and {c.skip}")
        if c.guidance_min > c.guidance_max:
            raise FewstepError(f"guidance_min {c.guidance_min} > guidance_max {c.guidance_max}")
        # noisy grid, decreasing; index N stands for clean data
        self.grid = consistency_grid(teacher.process, c.num_timesteps, c.spacing)
        self.embed_guidance = bool(c.guidance_embed and teacher.conditional)
        dim = math.prod(teacher.data_shape or (1,))
        self.huber_c = c.huber_c if c.huber_c is not None else 0.00054 * math.sqrt(dim)

    def _boundary(self):
        kind = self.config.boundary
        if kind == "auto":
            kind = "lcm" if isinstance(self.teacher.process, VPDiscrete) else "none"
        return {"type": "lcm", "sigma_data": 0.5, "time_scale": 10.0} if kind == "lcm" else None

    def networks(self) -> dict[str, Role]:
        extra = {"guidance_embed": True} if self.embed_guidance else {}
        student = self.student_from_teacher(**extra)
        student.boundary = self._boundary()
        roles = {"teacher": Role(self.teacher), "student": Role(student, trainable=True)}
        if self.config.target == "ema":
            import copy

            roles["target"] = Role(copy.deepcopy(student).requires_grad_(False), ema_of="student",
                                   ema_decay=self.config.target_decay)
        return roles

    def phases(self) -> list[Phase]:
        return [Phase("student", ("student",))]

    def _guidance(self, batch: Batch, ctx: StepContext):
        c = self.config
        if not self.teacher.conditional:
            return 1.0, 1.0
        if self.embed_guidance:
            w = c.guidance_min + (c.guidance_max - c.guidance_min) * ctx.rand(batch.size)
            w = w.to(ctx.device, torch.float32)
            return w, w  # the teacher is guided by w; the student and target take w as an input
        return self.guidance, 1.0

    def loss(self, phase, batch, nets, ctx):
        c = self.config
        n = c.num_timesteps
        x0 = batch.x0
        j = ctx.randint(0, n - c.skip + 1, batch.size)
        t_hi = self.grid[j]
        lo_idx = j + c.skip
        clean = lo_idx >= n
        t_lo = self.grid[lo_idx.clamp(max=n - 1)]
        eps = ctx.randn(x0.shape, like=x0)
        w_teacher, w_student = self._guidance(batch, ctx)
        x_hi = self.teacher.process.add_noise(x0, eps, t_hi.to(x0.device, torch.float32))
        with torch.no_grad():
            x_lo, target = self._target(nets, x_hi, t_hi, t_lo, clean, batch.cond, w_teacher, w_student)
        pred = nets["student"](x_hi, t_hi.to(x0.device, torch.float32), batch.cond, w_student)
        diff = (pred.float() - target.float()).flatten(1)
        return {"loss": self.distance(diff).mean(), "mse": diff.pow(2).mean().detach()}

    def distance(self, diff: torch.Tensor) -> torch.Tensor:
        """Per-sample d(pred, target) from diff = pred - target (B, D): L2 (mean square) or pseudo-Huber
        sqrt(|d|^2 + c^2) - c over the sample (Song & Dhariwal 2023) or per element, averaged (LCM)."""
        c = self.config
        if c.loss == "l2":
            return diff.pow(2).mean(1)
        if c.huber_elementwise:
            return (torch.sqrt(diff.pow(2) + self.huber_c ** 2) - self.huber_c).mean(1)
        return torch.sqrt(diff.pow(2).sum(1) + self.huber_c ** 2) - self.huber_c

    def _target(self, nets, x_hi, t_hi, t_lo, clean, cond, w_teacher, w_student):
        """Teacher step x_{t_hi} -> x_{t_lo} (per sample; Euler to clean data where t_lo is clean) and
        the target network's x0 there."""
        teacher = nets["teacher"]
        dev = x_hi.device
        x_lo = torch.empty_like(x_hi)
        clean_rows, noisy_rows = clean.nonzero().flatten().to(dev), (~clean).nonzero().flatten().to(dev)
        for rows, is_clean in ((clean_rows, True), (noisy_rows, False)):
            if rows.numel() == 0:
                continue
            sub_cond = _index(cond, rows)
            w = w_teacher[rows] if isinstance(w_teacher, torch.Tensor) else w_teacher
            hi = t_hi[rows.cpu()]
            if is_clean:  # the step to clean data: the teacher's x0 prediction
                x_lo[rows] = teacher(x_hi[rows], hi.to(dev, torch.float32), sub_cond, w).to(x_hi.dtype)
            else:
                ts = torch.stack([hi, t_lo[rows.cpu()]])
                x_lo[rows] = ode_solve(teacher, x_hi[rows], ts, solver=self.config.solver, cond=sub_cond, guidance=w)
        target_net = nets.get("target", nets["student"])
        target = target_net(x_lo, t_lo.to(dev, torch.float32), cond, w_student)
        target = torch.where(clean.to(dev).reshape((-1,) + (1,) * (x_lo.ndim - 1)), x_lo, target)
        return x_lo, target

    def student_meta(self) -> dict:
        meta = super().student_meta()
        if self.embed_guidance:  # sample at the run's --guidance, inside the range the student was trained on
            meta["default_guidance"] = min(max(self.guidance, self.config.guidance_min), self.config.guidance_max)
        return meta


def consistency_grid(process, n: int, spacing: str = "auto") -> torch.Tensor:
    """The N decreasing noisy times of the consistency grid (clean data follows the last one).

    auto: Karras sigmas (rho = 7, 80 -> 0.002) for EDM teachers as in Song et al.; diffusers' trailing
    integer timesteps for discrete VP teachers (N = 1000 gives 999, 998, ..., 0, so LCM's skip 20 steps
    999 -> 979 -> ...); uniform in time otherwise (flow: 1, 1 - 1/N, ..., 1/N).
    """
    if spacing == "auto":
        spacing = "karras" if isinstance(process, EDM) else "trailing" if isinstance(process, VPDiscrete) else "uniform"
    return sampling_timesteps(process, n, spacing)


def _index(cond, rows):
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[rows] for k, v in cond.items()}
    return cond[rows]


@register_method("lcm")
class LatentConsistencyDistillation(ConsistencyDistillation):
    config_class = LCMConfig
    description = "LCM (Luo et al. 2023): skipping-step DDIM on a 1000-step grid, guidance-scale input"
    recipes = {
        "2d": {"iters": 1000, "batch_size": 256, "lr": 1e-3, "ema_decay": 0.995},
        "image": {"iters": 1500, "batch_size": 128, "lr": 5e-4, "ema_decay": 0.999},
        # LCM-LoRA's rank 64 and lr 1e-4; the student learns the teacher at a fixed CFG scale, without a guidance
        # input, so the LoRA file is all it needs
        "text2image": {"iters": 1000, "batch_size": 8, "lr": 1e-4, "ema_decay": 0.999, "lora_rank": 64,
                       "guidance": 7.5, "options": {"guidance_embed": False}},
    }
