"""Gaussian noise processes x_t = alpha(t) x0 + sigma(t) eps, each in its own native time.

Every process exposes alpha, sigma, their time derivatives, the noise-to-signal ratio
r(t) = sigma/alpha (the EDM sigma, Karras et al. 2022) and its inverse. Two processes describe
the same noisy state when their ratios agree, which gives the exact time maps between
processes (``convert_time``) and the rescaling of states (``convert_state``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fewstep.errors import FewstepError

Tensor = torch.Tensor


def to_device(t: Tensor, device, dtype: torch.dtype | None = None) -> Tensor:
    """`t.to(device, dtype)` (device None: where it is), but a CPU tensor bound for CUDA goes through pinned memory
    and is copied without blocking (a copy from pageable memory waits for the GPU to finish everything queued: a
    host sync). The values are the same either way."""
    device = torch.device(device) if device is not None else t.device
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device=device, dtype=dtype, non_blocking=True)
    return t.to(device=device, dtype=dtype)


def as_time(t: Any, like: Tensor | None = None) -> Tensor:
    """Times as a float tensor (float64 unless `like` says otherwise)."""
    if isinstance(t, Tensor):
        out = t
    else:
        out = torch.as_tensor(t, dtype=torch.float64)
    if like is not None:
        out = to_device(out, like.device)
    if not out.is_floating_point():
        out = out.to(torch.float64)
    return out


def expand_like(c: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient of shape () or (B,) to broadcast against x (B, ...)."""
    c = to_device(c, x.device, x.dtype)
    if c.ndim == 0:
        return c
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


class NoiseProcess:
    """x_t = alpha(t) x0 + sigma(t) eps with t in [t_min, t_max] (t_max is the noisiest)."""

    name: str = "process"
    t_min: float = 0.0
    t_max: float = 1.0

    # -- to be implemented -------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def t_from_ratio(self, r: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Inverse of ratio(t) = sigma(t)/alpha(t), clamped to [t_min, t_max]."""
        raise NotImplementedError

    def config(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- derived -----------------------------------------------------------
    def ratio(self, t: Tensor) -> Tensor:
        """Noise-to-signal ratio sigma/alpha (the EDM sigma); +inf where alpha = 0."""
        t = as_time(t)
        return self.sigma(t) / self.alpha(t)

    def logsnr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2)."""
        return -2.0 * torch.log(self.ratio(t))

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps, with t of shape () or (B,)."""
        t = as_time(t, x0)
        return expand_like(self.alpha(t), x0) * x0 + expand_like(self.sigma(t), x0) * eps

    def prior_std(self, t: Tensor) -> Tensor:
        """Std of x_t for unit-variance data: sqrt(alpha^2 + sigma^2) (diffusers' init_noise_sigma)."""
        t = as_time(t)
        return torch.sqrt(self.alpha(t) ** 2 + self.sigma(t) ** 2)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


@dataclass(frozen=True, repr=False)
class RectifiedFlow(NoiseProcess):
    """Rectified flow / flow matching (Liu et al. 2023): x_t = (1 - t) x0 + t eps, t in [0, 1]."""

    name = "flow"
    t_min = 0.0
    t_max = 1.0

    def alpha(self, t):
        return 1.0 - as_time(t)

    def sigma(self, t):
        return as_time(t).clone()

    def d_alpha(self, t):
        return -torch.ones_like(as_time(t))

    def d_sigma(self, t):
        return torch.ones_like(as_time(t))

    def t_from_ratio(self, r):
        r = as_time(r)
        return torch.where(torch.isinf(r), torch.ones_like(r), r / (1.0 + r))

    def config(self):
        return {"type": "flow"}


@dataclass(frozen=True, repr=False)
class TrigFlow(NoiseProcess):
    """TrigFlow (Lu & Song 2024): x_t = cos(t) x0 + sin(t) sigma_d eps, t in [0, pi/2]."""

    sigma_d: float = 1.0
    name = "trigflow"
    t_min = 0.0
    t_max = math.pi / 2

    def alpha(self, t):
        return torch.cos(as_time(t))

    def sigma(self, t):
        return self.sigma_d * torch.sin(as_time(t))

    def d_alpha(self, t):
        return -torch.sin(as_time(t))

    def d_sigma(self, t):
        return self.sigma_d * torch.cos(as_time(t))

    def ratio(self, t):
        t = as_time(t)
        # cos(pi/2) is not exactly 0 in floating point; make the endpoint exact.
        r = self.sigma_d * torch.tan(t)
        return torch.where(t >= self.t_max, torch.full_like(r, math.inf), r)

    def t_from_ratio(self, r):
        return torch.atan(as_time(r) / self.sigma_d)

    def config(self):
        return {"type": "trigflow", "sigma_d": self.sigma_d}


@dataclass(frozen=True, repr=False)
class EDM(NoiseProcess):
    """EDM / variance-exploding (Karras et al. 2022): x_t = x0 + t eps, t is sigma."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    name = "edm"

    @property
    def t_min(self):  # type: ignore[override]
        return self.sigma_min

    @property
    def t_max(self):  # type: ignore[override]
        return self.sigma_max

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return as_time(t).clone()

    def d_alpha(self, t):
        return torch.zeros_like(as_time(t))

    def d_sigma(self, t):
        return torch.ones_like(as_time(t))

    def t_from_ratio(self, r):
        return as_time(r).clamp(self.sigma_min, self.sigma_max)

    def config(self):
        return {"type": "edm", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


def betas_for_schedule(
    schedule: str, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """The DDPM beta schedules of diffusers/Stable Diffusion, in float64.

    linear (Ho et al. 2020), scaled_linear (SD: linear in sqrt(beta)), squaredcos_cap_v2
    (Nichol & Dhariwal 2021 cosine, betas capped at 0.999).
    """
    T = int(num_train_timesteps)
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "squaredcos_cap_v2":

        def abar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float64
        )
    raise FewstepError(
        f"unknown beta schedule {schedule!r}; allowed: linear, scaled_linear, squaredcos_cap_v2"
    )


class VPDiscrete(NoiseProcess):
    """Discrete VP/DDPM (Ho et al. 2020): alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).

    Native time is the training timestep index t in [0, T-1]. Between integers the process is
    continued by interpolating log r(t) linearly, so every t has exact alpha, sigma, derivatives
    and an exact inverse; at integers it equals the discrete table.
    """

    name = "vp"

    def __init__(self, alphas_cumprod: Tensor, schedule: dict | None = None):
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if acp.numel() < 2 or not bool(torch.all((acp > 0) & (acp < 1))):
            raise FewstepError("alphas_cumprod must hold at least 2 values in (0, 1)")
        if not bool(torch.all(acp[1:] < acp[:-1])):
            raise FewstepError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = acp
        self.log_r = 0.5 * (torch.log1p(-acp) - torch.log(acp))
        self.t_min = 0.0
        self.t_max = float(acp.numel() - 1)
        self._schedule = schedule

    @classmethod
    def from_schedule(cls, schedule="scaled_linear", num_train_timesteps=1000, beta_start=0.00085,
                      beta_end=0.012) -> VPDiscrete:
        betas = betas_for_schedule(schedule, num_train_timesteps, beta_start, beta_end)
        acp = torch.cumprod(1.0 - betas, dim=0)
        return cls(acp, schedule={"beta_schedule": schedule, "num_train_timesteps": int(num_train_timesteps),
                                  "beta_start": beta_start, "beta_end": beta_end})

    @classmethod
    def from_diffusers_config(cls, config: dict) -> VPDiscrete:
        """Build from a diffusers scheduler config (DDPM/DDIM/Euler/... scheduler_config.json)."""
        if config.get("trained_betas") is not None:
            betas = torch.as_tensor(config["trained_betas"], dtype=torch.float64)
            return cls(torch.cumprod(1.0 - betas, dim=0))
        return cls.from_schedule(
            config.get("beta_schedule", "linear"),
            config.get("num_train_timesteps", 1000),
            config.get("beta_start", 0.0001),
            config.get("beta_end", 0.02),
        )

    def _segment(self, t: Tensor):
        t = as_time(t)
        table = self.log_r.to(t.device)
        tc = t.to(torch.float64).clamp(self.t_min, self.t_max)
        i0 = torch.clamp(torch.floor(tc).long(), 0, table.numel() - 2)
        frac = tc - i0.to(torch.float64)
        slope = table[i0 + 1] - table[i0]
        log_r = table[i0] + frac * slope
        return log_r.to(t.dtype), slope.to(t.dtype)

    def ratio(self, t):
        return torch.exp(self._segment(t)[0])

    def alpha(self, t):
        r = self.ratio(t)
        return torch.rsqrt(1.0 + r * r)

    def sigma(self, t):
        r = self.ratio(t)
        return r * torch.rsqrt(1.0 + r * r)

    def d_alpha(self, t):
        log_r, slope = self._segment(t)
        r = torch.exp(log_r)
        return -r * r * slope * (1.0 + r * r) ** -1.5

    def d_sigma(self, t):
        log_r, slope = self._segment(t)
        r = torch.exp(log_r)
        return r * slope * (1.0 + r * r) ** -1.5

    def t_from_ratio(self, r):
        r = as_time(r)
        table = self.log_r.to(r.device)
        lr = torch.log(r.to(torch.float64)).clamp(float(table[0]), float(table[-1]))
        i1 = torch.searchsorted(table, lr.reshape(-1).contiguous()).reshape(lr.shape).clamp(1, table.numel() - 1)
        i0 = i1 - 1
        frac = (lr - table[i0]) / (table[i1] - table[i0])
        return (i0.to(torch.float64) + frac).to(r.dtype)

    def config(self):
        if self._schedule is not None:
            return {"type": "vp", **self._schedule}
        return {"type": "vp", "alphas_cumprod": self.alphas_cumprod.tolist()}

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()


PROCESS_TYPES = ("flow", "trigflow", "edm", "vp")


def process_from_config(config: dict) -> NoiseProcess:
    """Inverse of ``process.config()``."""
    kind = config.get("type")
    if kind == "flow":
        return RectifiedFlow()
    if kind == "trigflow":
        return TrigFlow(sigma_d=float(config.get("sigma_d", 1.0)))
    if kind == "edm":
        return EDM(float(config.get("sigma_min", 0.002)), float(config.get("sigma_max", 80.0)))
    if kind == "vp":
        if "alphas_cumprod" in config:
            return VPDiscrete(torch.tensor(config["alphas_cumprod"], dtype=torch.float64))
        return VPDiscrete.from_schedule(
            config.get("beta_schedule", "scaled_linear"), config.get("num_train_timesteps", 1000),
            config.get("beta_start", 0.00085), config.get("beta_end", 0.012),
        )
    raise FewstepError(f"unknown process type {kind!r}; allowed: {', '.join(PROCESS_TYPES)}")


def convert_time(t: Tensor, src: NoiseProcess, dst: NoiseProcess) -> Tensor:
    """The time of `dst` with the same noise-to-signal ratio (same SNR) as time t of `src`."""
    return dst.t_from_ratio(src.ratio(as_time(t)))


def convert_state(x: Tensor, t: Tensor, src: NoiseProcess, dst: NoiseProcess) -> tuple[Tensor, Tensor]:
    """Map a noisy state of `src` at time t to the identical state of `dst`.

    x_dst = (alpha_dst(s) / alpha_src(t)) x_src at s = convert_time(t): same x0, same eps.
    Where both alphas are zero (pure noise) the sigmas are used instead.
    """
    t = as_time(t, x)
    s = convert_time(t, src, dst)
    a_src, a_dst = src.alpha(t), dst.alpha(s)
    scale = torch.where(a_src.abs() > 1e-12, a_dst / torch.where(a_src.abs() > 1e-12, a_src, torch.ones_like(a_src)),
                        dst.sigma(s) / src.sigma(t))
    return expand_like(scale, x) * x, s
