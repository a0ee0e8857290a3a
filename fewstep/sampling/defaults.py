"""A model's own sampler settings: what `fewstep sample --model M` uses when a flag is left out.

A saved Denoiser's meta may name its default solver, step count, re-noise rule, guidance scale and
time spacing (`default_solver`, `default_steps`, `default_renoise`, `default_guidance`,
`default_spacing`), and the exact times it was trained to sample at (`timesteps`: one decreasing list,
or a mapping from a step count to its list). Teachers trained here carry none of these and sample with
Heun, 50 uniform steps, no guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.diffusion.timesteps import SPACINGS
from fewstep.errors import FewstepError
from fewstep.sampling.solvers import check_renoise, check_solver, resolve_timesteps


@dataclass
class SamplerSettings:
    steps: int
    solver: str
    renoise: str
    guidance: float
    spacing: str  # "saved" when the model's own time list is used
    timesteps: torch.Tensor  # decreasing model times (float64, CPU)

    def describe(self) -> dict:
        return {"steps": self.steps, "solver": self.solver, "renoise": self.renoise, "guidance": self.guidance,
                "spacing": self.spacing, "timesteps": [round(float(t), 6) for t in self.timesteps]}


def saved_timesteps(meta: dict, steps: int) -> list[float] | None:
    """The time list a model saved for `steps` steps, or None."""
    ts = meta.get("timesteps")
    if isinstance(ts, dict):
        ts = ts.get(str(steps), ts.get(steps))
    if isinstance(ts, (list, tuple)) and len(ts) == int(steps):
        return [float(t) for t in ts]
    return None


def sampler_settings(denoiser, *, steps: int | None = None, solver: str | None = None, renoise: str | None = None,
                     guidance: float | None = None, spacing: str | None = None) -> SamplerSettings:
    """Resolve sampler settings: explicit arguments win, then the model's meta, then Heun / 50 / uniform.

    The saved time list is used when its length matches `steps` and no `spacing` was given.
    """
    meta = denoiser.meta
    steps = int(steps if steps is not None else meta.get("default_steps", 50))
    if steps < 1:
        raise FewstepError(f"steps must be >= 1, got {steps}")
    solver = check_solver(solver or meta.get("default_solver", "heun"))
    renoise = check_renoise(renoise or meta.get("default_renoise", "fresh"))
    guidance = float(guidance if guidance is not None else meta.get("default_guidance", 1.0))
    saved = saved_timesteps(meta, steps) if spacing is None else None
    if saved is not None:
        return SamplerSettings(steps, solver, renoise, guidance, "saved",
                               resolve_timesteps(denoiser.process, timesteps=saved))
    spacing = spacing or meta.get("default_spacing", "uniform")
    if spacing not in SPACINGS:
        raise FewstepError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    return SamplerSettings(steps, solver, renoise, guidance, spacing,
                           resolve_timesteps(denoiser.process, steps, None, spacing))
