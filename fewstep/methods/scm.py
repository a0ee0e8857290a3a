"""Continuous-time consistency models: sCD and sCT (Lu & Song 2024, "Simplifying, stabilizing and scaling
continuous-time consistency models").

The student is the teacher's network viewed in TrigFlow (`TrigFlowDenoiser`: x = cos(t) x0 + sin(t) sigma_d eps,
F = cos(t) eps - sin(t) x0 / sigma_d, consistency function f = cos(t) x - sin(t) sigma_d F); it is saved as an
ordinary Denoiser in the teacher's process and samples with the shared few-step sampler. Each step:

    x_t = cos(t) x0 + sin(t) sigma_d eps,  sigma_d tan(t) = sigma,  log sigma ~ N(P_mean, P_std)
    dx_t/dt = sigma_d F_teacher(x_t, t) with CFG (sCD, --mode distill)  or  cos(t) sigma_d eps - sin(t) x0 (sCT)
    dF^-/dt = JVP of the stop-gradient student along (dx_t/dt, 1), no graph
    g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt),   r: 0 -> 1 (tangent warm-up)
    g <- g / (||g|| + c)                                                             (tangent normalisation)
    loss = exp(-u(t)) ||F_theta - sg(F_theta) - g||^2 / D + u(t)    (u: learned log-variance; or a fixed scale)

whose gradient is -2 g . dF_theta/dtheta / D: with r = 1, g = cos(t) df^-/dt, so the student is pushed to
make f constant along the teacher's ODE. `scm_loss` is the reusable term (rCM adds a DMD regulariser to it).

Learning rates: each step moves f by -eta df/dt, an explicit Euler step of the advection equation
df/dt = 0 with an exact (non-dissipative) derivative, which amplifies components of f that oscillate fast in
t. Networks with 1000-scaled sinusoidal time embeddings (the built-in teachers, DDPM/SD-style models) have such
components, so sCM needs much smaller learning rates than discrete CD with them (the sCM paper's reason for
small time-embedding scales); the recipes use 5e-5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fewstep.diffusion.processes import TrigFlow, expand_like
from fewstep.diffusion.timesteps import sample_timesteps
from fewstep.errors import FewstepError, check_choice
from fewstep.methods.base import Batch, DistillMethod, MethodConfig, Phase, Role, RunContext, StepContext
from fewstep.methods.registry import register_method
from fewstep.models.embeddings import sinusoidal_embedding
from fewstep.models.jvp import JVP, JVP_BACKENDS, default_fd_step
from fewstep.models.trigflow import TrigFlowDenoiser, unwrap_model

MODES = ("distill", "train")
TIME_DISTS = ("lognormal", "logit_normal")
TANGENT_NORMS = ("rms", "l2", "none")
WEIGHTINGS = ("adaptive", "fixed")


@dataclass
class SCMConfig(MethodConfig):
    mode: str = "distill"  # distill (sCD: dx/dt from the teacher, with --guidance CFG) | train (sCT: from data)
    sigma_d: float = 0.5  # TrigFlow data scale: x = cos(t) x0 + sin(t) sigma_d eps
    time_dist: str = "lognormal"  # lognormal: log(sigma_d tan t) ~ N(p_mean, p_std) | logit_normal: logit(flow t)
    p_mean: float = -1.0
    p_std: float = 1.4
    tangent_warmup: int = 1000  # iterations over which r goes 0 -> 1
    tangent_norm: str = "rms"  # g / (||g|| + c) with ||g|| the per-sample rms (size-invariant) | l2 | none
    tangent_c: float = 0.1
    weighting: str = "adaptive"  # adaptive (learned log-variance u(t), its own role) | fixed
    weight_scale: float = 1.0  # the fixed weighting's scale (rCM: 100)
    jvp: str = "auto"  # auto | kernel | func | fd  (see fewstep.models.jvp)
    fd_step: float | None = None  # finite-difference step in TrigFlow time (None: by dtype)


class LogVarianceHead(nn.Module):
    """u(t), the adaptive weighting's learned log-variance (Lu & Song 2024; SANA-Sprint): an MLP of fp32
    sinusoidal features of the TrigFlow time, output zero-initialised (weight exp(-u) = 1 at the start)."""

    def __init__(self, width: int = 64, freq_dim: int = 64):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_scale = 1000.0 / (math.pi / 2)  # t in [0, pi/2] -> [0, 1000], like the networks' times
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = sinusoidal_embedding(t.to(torch.float32) * self.time_scale, self.freq_dim)
        with torch.autocast(device_type=t.device.type, enabled=False):
            return self.mlp(feats.to(self.mlp[0].weight.dtype)).squeeze(-1).float()


def half_precision(like: torch.Tensor) -> torch.dtype | None:
    """The run's mixed-precision dtype (bf16/fp16) when autocast is on for `like`'s device, else None: sCM runs
    its JVP in it (the stop-gradient network cast for that pass), so the fused attention kernel runs on CUDA."""
    kind = like.device.type
    if not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def scm_tangent(F_minus: torch.Tensor, dF_dt: torch.Tensor, x_t: torch.Tensor, dx_dt: torch.Tensor, t: torch.Tensor,
                sigma_d: float, r: float = 1.0) -> torch.Tensor:
    """g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt) (Lu & Song 2024's training
    tangent, with their warm-up r). With r = 1 this is cos(t) df^-/dt for f = cos(t) x_t - sin(t) sigma_d F^-."""
    work = torch.promote_types(F_minus.dtype, torch.float32)
    cos, sin = expand_like(torch.cos(t), F_minus).to(work), expand_like(torch.sin(t), F_minus).to(work)
    F_minus, dF_dt, x_t, dx_dt = (v.to(work) for v in (F_minus, dF_dt, x_t, dx_dt))
    return -cos * cos * (sigma_d * F_minus - dx_dt) - r * cos * sin * (x_t + sigma_d * dF_dt)


def normalize_tangent(g: torch.Tensor, kind: str = "rms", c: float = 0.1) -> torch.Tensor:
    """Tangent normalisation g / (||g|| + c) per sample (Lu & Song 2024); "rms" uses ||g|| / sqrt(D), the
    size-invariant norm of their reference code, "l2" the plain norm, "none" leaves g alone."""
    check_choice("tangent_norm", kind, TANGENT_NORMS)
    if kind == "none":
        return g
    norm = g.flatten(1).norm(dim=1)
    if kind == "rms":
        norm = norm / math.sqrt(g[0].numel())
    return g / expand_like(norm + c, g)


@register_method("scm")
class ContinuousConsistency(DistillMethod):
    config_class = SCMConfig
    needs_data = True
    description = ("sCM (Lu & Song 2024): continuous-time consistency in TrigFlow; sCD with the teacher's CFG "
                   "velocity, or sCT from data (--mode train)")
    # unstable at CD's learning rates with these teachers (their 1000-scaled time embeddings make dF/dt large)
    recipes = {
        "2d": {"iters": 4000, "batch_size": 256, "lr": 5e-5, "ema_decay": 0.995,
               "options": {"sigma_d": 1.0, "tangent_warmup": 500}},
        "image": {"iters": 2000, "batch_size": 128, "lr": 5e-5, "ema_decay": 0.999,
                  "options": {"sigma_d": 0.5, "tangent_warmup": 500}},
    }
    cli_options = {"mode": "sCM: distill (sCD, the teacher's velocity) | train (sCT, from data); the same as "
                           "--opt mode=MODE."}

    def __init__(self, teacher, config=None, *, guidance: float = 1.0):
        super().__init__(teacher, config, guidance=guidance)
        c = self.config
        for name, value, allowed in (("mode", c.mode, MODES), ("time_dist", c.time_dist, TIME_DISTS),
                                     ("tangent_norm", c.tangent_norm, TANGENT_NORMS),
                                     ("weighting", c.weighting, WEIGHTINGS), ("jvp", c.jvp, JVP_BACKENDS)):
            check_choice(name, value, allowed)
        if not c.sigma_d > 0:
            raise FewstepError(f"sigma_d must be > 0, got {c.sigma_d}")
        if not c.p_std > 0:
            raise FewstepError(f"p_std must be > 0, got {c.p_std}")
        if c.tangent_warmup < 0 or c.tangent_c < 0 or c.weight_scale <= 0:
            raise FewstepError(f"need tangent_warmup >= 0, tangent_c >= 0 and weight_scale > 0, got "
                               f"{c.tangent_warmup}, {c.tangent_c} and {c.weight_scale}")
        if c.fd_step is not None and not c.fd_step > 0:
            raise FewstepError(f"fd_step must be > 0, got {c.fd_step}")
        self.trigflow = TrigFlow(sigma_d=c.sigma_d)
        self.t_lo, self.t_hi = TrigFlowDenoiser(teacher, c.sigma_d).time_range()
        self.jvp = JVP(c.jvp, c.fd_step)
        self._jvp_logged: dict | None = None

    # -- networks ------------------------------------------------------------------------------
    def networks(self) -> dict[str, Role]:
        roles = {"student": Role(self.student_from_teacher(), trainable=True, betas=(0.9, 0.99))}
        if self.config.mode == "distill":
            roles["teacher"] = Role(self.teacher)
        if self.config.weighting == "adaptive":
            roles["weighting"] = Role(LogVarianceHead(), trainable=True, betas=(0.9, 0.99))
        return roles

    def phases(self) -> list[Phase]:
        trains = ("student", "weighting") if self.config.weighting == "adaptive" else ("student",)
        return [Phase("student", trains)]

    def loss(self, phase: str, batch: Batch, nets: dict[str, nn.Module], ctx: StepContext) -> dict[str, torch.Tensor]:
        return self.scm_loss(batch, nets, ctx)

    def prepare(self, run: RunContext) -> None:
        """Logs the JVP backend once it is known (after the first student step): {"event": "jvp", "backend",
        "attention" (the attention paths of one JVP: triton, reference, masked), "dtype"}."""
        if self.jvp.dtype is not None and self._jvp_logged != self.jvp.describe():  # dtype: set by a call
            self._jvp_logged = self.jvp.describe()
            run.log({"event": "jvp", "iteration": run.iteration, **self._jvp_logged})

    def metrics(self) -> dict:
        """The JVP backend the run used (metrics.json): jvp_backend, jvp_attention, jvp_dtype."""
        if self.jvp.dtype is None:  # no JVP ran (e.g. resumed at the end)
            return {}
        d = self.jvp.describe()
        return {"jvp_backend": d["backend"], "jvp_attention": d["attention"], "jvp_dtype": d["dtype"]}

    # -- the sCM term --------------------------------------------------------------------------
    def sample_time(self, n: int, ctx: StepContext) -> torch.Tensor:
        """n TrigFlow times (float64, CPU) from the configured distribution, inside the teacher's range."""
        c = self.config
        t = sample_timesteps(n, self.trigflow, c.time_dist, generator=ctx.generator, mean=c.p_mean, std=c.p_std)
        return t.clamp(self.t_lo, self.t_hi)

    def tangent_warmup(self, iteration: int) -> float:
        """r = min(1, iteration / tangent_warmup)."""
        w = self.config.tangent_warmup
        return 1.0 if w == 0 else min(1.0, iteration / w)

    def fd_steps(self, t: torch.Tensor, dtype: torch.dtype):
        """Per-sample (h+, h-) that keep t +- h inside the time range (one-sided at its ends)."""
        h = self.config.fd_step if self.config.fd_step is not None else default_fd_step(dtype)
        return (torch.clamp(self.t_hi - t, max=h, min=0.0), torch.clamp(t - self.t_lo, max=h, min=0.0))

    def velocity(self, x_t, t, x0, eps, cond, nets) -> torch.Tensor:
        """dx_t/dt: the teacher's guided ODE velocity sigma_d F_teacher (sCD) or the path's cos(t) sigma_d eps
        - sin(t) x0 (sCT)."""
        sd = self.config.sigma_d
        if self.config.mode == "distill":
            return TrigFlowDenoiser(nets["teacher"], sd).velocity(x_t, t, cond, self.guidance).to(x_t.dtype)
        cos, sin = expand_like(torch.cos(t), x0), expand_like(torch.sin(t), x0)
        return cos * sd * eps - sin * x0

    def tangent(self, x_t, t, dx_dt, cond, nets, r: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(F_theta with its graph, the raw tangent g) at TrigFlow states x_t, times t (float64) and velocity dx_dt;
        dF^-/dt comes from the configured JVP backend through the unwrapped student, under no_grad."""
        sd = self.config.sigma_d
        base = unwrap_model(nets["student"])
        frozen = TrigFlowDenoiser(base, sd, through_forward=False)  # outside DDP and accelerate's autocast wrapper
        with torch.no_grad():
            dF_dt = self.jvp(lambda x, tt: frozen(x, tt, cond), (x_t, t), (dx_dt, torch.ones_like(t)),
                             modules=[base], fd_steps=self.fd_steps(t, x_t.dtype), dtype=half_precision(x_t))
        F = TrigFlowDenoiser(nets["student"], sd)(x_t, t, cond)
        return F, scm_tangent(F.detach(), dF_dt, x_t, dx_dt, t, sd, r)

    def scm_loss(self, batch: Batch, nets: dict[str, nn.Module], ctx: StepContext) -> dict[str, torch.Tensor]:
        """The sCM loss on real data `batch.x0` (module docstring); "loss" is back-propagated, the rest logged.
        Draws, in order: times, then noise, from ctx.generator."""
        c = self.config
        x0 = batch.x0
        t = self.sample_time(x0.shape[0], ctx).to(x0.device)
        eps = ctx.randn(x0.shape, like=x0)
        sd = c.sigma_d
        x_t = expand_like(torch.cos(t), x0) * x0 + expand_like(torch.sin(t) * sd, x0) * eps
        with torch.no_grad():
            dx_dt = self.velocity(x_t, t, x0, eps, batch.cond, nets)
        r = self.tangent_warmup(ctx.iteration)
        F, g = self.tangent(x_t, t, dx_dt, batch.cond, nets, r)
        g_rms = g.flatten(1).pow(2).mean(1).sqrt()
        g = normalize_tangent(g, c.tangent_norm, c.tangent_c)
        F = F.to(g.dtype)
        mse = (F - F.detach() - g).flatten(1).pow(2).mean(1)
        out = {"mse": mse.mean().detach(), "tangent_rms": g_rms.mean().detach(),
               "r": torch.tensor(r, dtype=torch.float32)}
        if c.weighting == "adaptive":
            u = nets["weighting"](t)
            out["loss"] = (torch.exp(-u) * mse + u).mean()
            out["logvar"] = u.mean().detach()
        else:
            out["loss"] = c.weight_scale * mse.mean()
        return out
