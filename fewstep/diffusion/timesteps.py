"""Timesteps: training-time samplers and the decreasing time lists samplers run on.

All samplers return times in the native time of a given process. Distributions that papers define
on another axis are mapped exactly through the shared noise-to-signal ratio:
- ``uniform``: uniform on [t_lo, t_hi] of the process' own time.
- ``logit_normal``: flow time s = sigmoid(N(mean, std)) (Esser et al. 2024, SD3).
- ``lognormal``: EDM sigma with log sigma ~ N(mean, std) (Karras et al. 2022; sCM uses sigma = sigma_d tan t).
- ``u_shaped``: flow time with density proportional to cosh(a (s - 1/2)) (Lee et al. 2024, 2-RF++).
- ``grid``: uniform over a discrete list of times (e.g. a 1000-step grid or a student's step list).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fewstep.diffusion.processes import NoiseProcess, RectifiedFlow, VPDiscrete, convert_time
from fewstep.errors import FewstepError

TIMESTEP_SAMPLERS = ("uniform", "logit_normal", "lognormal", "u_shaped", "grid")
SPACINGS = ("uniform", "karras", "trailing", "shifted")

_FLOW = RectifiedFlow()
KARRAS_SIGMA_MIN, KARRAS_SIGMA_MAX = 0.002, 80.0


def _from_flow_time(s: torch.Tensor, process: NoiseProcess) -> torch.Tensor:
    return convert_time(s, _FLOW, process).clamp(process.t_min, process.t_max)


def sample_timesteps(
    n: int,
    process: NoiseProcess,
    kind: str = "uniform",
    *,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    a: float = 4.0,
    t_lo: float | None = None,
    t_hi: float | None = None,
    grid: Sequence[float] | None = None,
) -> torch.Tensor:
    """Draw n training times of `process` from the distribution `kind` (see module docstring)."""
    if kind == "uniform":
        lo = process.t_min if t_lo is None else t_lo
        hi = process.t_max if t_hi is None else t_hi
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return lo + (hi - lo) * u
    if kind == "logit_normal":
        s = torch.sigmoid(mean + std * torch.randn(n, generator=generator, dtype=torch.float64))
        return _from_flow_time(s, process)
    if kind == "lognormal":
        r = torch.exp(mean + std * torch.randn(n, generator=generator, dtype=torch.float64))
        return process.t_from_ratio(r).clamp(process.t_min, process.t_max)
    if kind == "u_shaped":
        # density p(s) = a cosh(a (s - 1/2)) / (2 sinh(a/2)); inverse CDF: s = 1/2 + asinh((2u - 1) sinh(a/2)) / a
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        s = 0.5 + torch.asinh((2.0 * u - 1.0) * math.sinh(a / 2.0)) / a
        return _from_flow_time(s, process)
    if kind == "grid":
        g = torch.as_tensor([] if grid is None else grid, dtype=torch.float64).flatten().cpu()
        if g.numel() == 0:
            raise FewstepError("the grid timestep sampler needs a non-empty list of times")
        idx = torch.randint(0, g.numel(), (n,), generator=generator)
        return g[idx]
    raise FewstepError(f"unknown timestep sampler {kind!r}; allowed: {', '.join(TIMESTEP_SAMPLERS)}")


def sampling_timesteps(
    process: NoiseProcess, steps: int, spacing: str = "uniform", *, rho: float = 7.0, shift: float = 1.0,
    t_max: float | None = None,
) -> torch.Tensor:
    """The `steps` decreasing times at which a sampler evaluates the model.

    The sampler always ends at clean data (sigma = 0) after the last of these times, as in
    k-diffusion and diffusers' Euler schedulers. Spacings:
    - ``uniform``: t_max - i (t_max - t_min) / steps, i = 0..steps-1 (for flow: 1, ..., 1/steps).
    - ``trailing``: for discrete VP, diffusers' "trailing" integer timesteps round(T - i T/steps) - 1.
    - ``karras``: EDM sigma spacing with exponent rho (Karras et al. 2022) between sigma 80 and 0.002,
      clipped to the ratios the process can represent.
    - ``shifted``: uniform flow time with SD3's shift s' = shift s / (1 + (shift - 1) s).
    """
    if steps < 1:
        raise FewstepError(f"steps must be >= 1, got {steps}")
    hi = process.t_max if t_max is None else float(t_max)
    i = torch.arange(steps, dtype=torch.float64)
    if spacing == "uniform":
        return hi - i * (hi - process.t_min) / steps
    if spacing == "trailing":
        if not isinstance(process, VPDiscrete):
            return hi - i * (hi - process.t_min) / steps
        T = process.num_train_timesteps
        return torch.round(T - i * T / steps) - 1.0
    if spacing == "karras":
        # EDM's default sigma range, intersected with what the process can represent
        r_hi = min(float(process.ratio(torch.tensor(hi, dtype=torch.float64))), KARRAS_SIGMA_MAX)
        r_lo = max(float(process.ratio(torch.tensor(process.t_min, dtype=torch.float64))), KARRAS_SIGMA_MIN)
        ramp = i / max(steps - 1, 1)
        r = (r_hi ** (1 / rho) + ramp * (r_lo ** (1 / rho) - r_hi ** (1 / rho))) ** rho
        return process.t_from_ratio(r)
    if spacing == "shifted":
        s = 1.0 - i / steps
        s = shift * s / (1.0 + (shift - 1.0) * s)
        # spread over the flow times the process can represent (all of [0, 1] for flow and TrigFlow),
        # so that bounded processes (EDM, VP) do not get repeated, clamped times
        ends = convert_time(torch.tensor([process.t_min, hi], dtype=torch.float64), process, _FLOW)
        return _from_flow_time(ends[0] + (ends[1] - ends[0]) * s, process)
    raise FewstepError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
