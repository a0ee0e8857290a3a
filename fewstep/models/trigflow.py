"""A TrigFlow view of any Denoiser (Lu & Song 2024), exact and without retraining.

TrigFlow: x = cos(t) x0 + sin(t) sigma_d eps, t in [0, pi/2], and the network predicts
F = cos(t) eps - sin(t) x0 / sigma_d, so that x0 = cos(t) x - sin(t) sigma_d F and the probability-flow
ODE is dx/dt = sigma_d F. A Denoiser in any process (flow, VP, EDM, TrigFlow with another sigma_d) is
called at its own native state with the same noise-to-signal ratio: s = r^-1(sigma_d tan t)
(`convert_time`) and x_s = (alpha(s) / cos t) x (`convert_state`); its prediction (any type, with CFG
and boundary scalings) gives (x0, eps) exactly (`to_x0_eps`), from which F follows. Every step is an
ordinary differentiable torch op, so forward-mode AD (sCM's JVP) sees the total derivative in t.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fewstep.diffusion.predictions import to_x0_eps
from fewstep.diffusion.processes import TrigFlow, as_time, convert_state, convert_time, expand_like


def unwrap_model(module: nn.Module) -> nn.Module:
    """The module inside DDP wrappers (DDP hides the Denoiser's process and prediction attributes)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(module, DistributedDataParallel):
        module = module.module
    return module


def compute_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of `module`'s first floating-point parameter outside modules kept in their own precision
    (`jvp_keep_dtype`: the built-in nets' fp32 time embedding), else `default`: the precision it computes in."""
    kept: set[int] = set()
    for m in module.modules():
        if id(m) in kept:
            continue
        if getattr(m, "jvp_keep_dtype", False):
            kept.update(id(k) for k in m.modules())
            continue
        for p in m.parameters(recurse=False):
            if p.is_floating_point():
                return p.dtype
    return default


class TrigFlowDenoiser(nn.Module):
    """F(x, t, cond, guidance) of a wrapped Denoiser, with x and t in TrigFlow(sigma_d) units.

    `denoiser` may be a DDP-wrapped Denoiser (it is called through its forward, so DDP sees the call);
    its process and prediction type are read from the module inside. `through_forward=False` calls the
    Denoiser's `predict` instead, bypassing wrappers that training frameworks put on `forward` (accelerate's
    mixed-precision autocast, DDP): for no-grad passes such as sCM's JVP.
    """

    def __init__(self, denoiser: nn.Module, sigma_d: float = 1.0, *, through_forward: bool = True):
        super().__init__()
        if not sigma_d > 0:
            raise ValueError(f"sigma_d must be > 0, got {sigma_d}")
        self.denoiser = denoiser
        base = unwrap_model(denoiser)
        self.process = base.process
        self.prediction = base.prediction
        self.native_sigma_d = float(base.sigma_d)
        self.sigma_d = float(sigma_d)
        self.trigflow = TrigFlow(sigma_d=self.sigma_d)
        self.through_forward = bool(through_forward)

    # -- time and state maps -------------------------------------------------------------------
    def native(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_s, s): the wrapped model's native state and time with the same x0 and eps as TrigFlow (x, t)."""
        t = _per_sample(as_time(t, x), x)
        x_s, s = convert_state(x, t, self.trigflow, self.process)
        return x_s.to(x.dtype), s

    def trigflow_time(self, s) -> torch.Tensor:
        """The TrigFlow time of native time s: atan(r(s) / sigma_d)."""
        return convert_time(as_time(s), self.process, self.trigflow)

    def time_range(self) -> tuple[float, float]:
        """The TrigFlow times whose noise level the native process represents ([0, pi/2] for flow)."""
        lo, hi = self.trigflow_time(torch.tensor([self.process.t_min, self.process.t_max], dtype=torch.float64))
        return float(lo), min(float(hi), math.pi / 2)

    # -- predictions ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t, cond=None, guidance=1.0) -> torch.Tensor:
        """F = cos(t) eps_hat - sin(t) x0_hat / sigma_d from the wrapped model's guided prediction."""
        t = _per_sample(as_time(t, x), x)
        x_s, s = self.native(x, t)
        base = unwrap_model(self.denoiser)
        call = self.denoiser if self.through_forward else base.predict
        # the model runs in its own precision (e.g. a frozen bf16 teacher), the conversions in x's dtype
        dtype = compute_dtype(base, x.dtype)
        pred = call(x_s.to(dtype), s, cond, guidance, kind=self.prediction).to(x.dtype)
        x0, eps = to_x0_eps(pred, x_s, s, self.process, self.prediction, self.native_sigma_d)
        out = expand_like(torch.cos(t), x) * eps - expand_like(torch.sin(t) / self.sigma_d, x) * x0
        return out.to(x.dtype)

    def velocity(self, x: torch.Tensor, t, cond=None, guidance=1.0) -> torch.Tensor:
        """The probability-flow ODE velocity dx/dt = sigma_d F (with CFG when guidance != 1)."""
        return self.sigma_d * self(x, t, cond, guidance)

    def x0(self, x: torch.Tensor, t, cond=None, guidance=1.0) -> torch.Tensor:
        """The clean estimate (the consistency function of a student): x0 = cos(t) x - sin(t) sigma_d F."""
        t = _per_sample(as_time(t, x), x)
        f = self(x, t, cond, guidance)
        return expand_like(torch.cos(t), x) * x - expand_like(torch.sin(t) * self.sigma_d, x) * f


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.expand(x.shape[0]) if t.ndim == 0 else t
