"""The shared sampler engine: ODE solvers and the few-step student sampler, for any Denoiser.

Solvers integrate the probability-flow ODE in rectified-flow coordinates, whatever the model's
own process: flow time s = r / (1 + r) with r = sigma(t) / alpha(t) (s = 1 is pure noise, s = 0
clean data) and state x_f = x_t (1 - s) / alpha(t) = (1 - s) x0 + s eps. The velocity there is
eps_hat - x0_hat. The model is always called at its own (x_t, t); states are reported in its own
process. In these coordinates:
- Euler is DDIM (Song et al. 2021) and equals diffusers' Euler scheduler on VP models;
- Heun is the trapezoidal 2nd-order method, with a plain Euler last step to s = 0 (Karras et al. 2022);
- DPM-Solver++(2M) (Lu et al. 2022) uses alpha = 1 - s, sigma = s, lambda = log(alpha / sigma),
  first order on the first step and on the step to clean data (as k-diffusion does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.diffusion.processes import NoiseProcess, as_time
from fewstep.diffusion.timesteps import sampling_timesteps
from fewstep.errors import FewstepError
from fewstep.sampling.seeds import noise_for_seeds

ODE_SOLVERS = ("euler", "heun", "dpm++2m")
SOLVERS = ODE_SOLVERS + ("fewstep",)
RENOISE = ("fresh", "deterministic")


@dataclass
class Trajectory:
    """A captured sampling path in the model's own process.

    x: final sample; xs: states (n + 1, B, ...) at ts[0..n-1] then the final sample; ts: the n model
    times; x0s: (n, B, ...) the x0 predictions made at each of those times.
    """

    x: torch.Tensor
    xs: torch.Tensor
    ts: torch.Tensor
    x0s: torch.Tensor


def flow_time(process: NoiseProcess, t: torch.Tensor) -> torch.Tensor:
    """s = r / (1 + r), the rectified-flow time with the same SNR (1 where alpha = 0)."""
    r = process.ratio(as_time(t).to(torch.float64))
    return torch.where(torch.isinf(r), torch.ones_like(r), r / (1.0 + r))


def _to_model_scale(process: NoiseProcess, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """c with x_t = c x_f at model time t and flow time s (alpha/(1-s), or sigma/s at pure noise)."""
    a = process.alpha(t)
    return torch.where(s < 1.0, a / torch.clamp(1.0 - s, min=1e-300), process.sigma(t) / s)


def check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise FewstepError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    return solver


def _resolve_timesteps(process, steps, timesteps, spacing) -> torch.Tensor:
    if timesteps is not None:
        ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
        if ts.numel() < 1:
            raise FewstepError("timesteps must not be empty")
        if ts.numel() > 1 and not bool(torch.all(ts[1:] < ts[:-1])):
            raise FewstepError(f"timesteps must be strictly decreasing, got {ts.tolist()}")
        return ts
    if steps is None:
        raise FewstepError("give steps or timesteps")
    return sampling_timesteps(process, int(steps), spacing)


class _Model:
    """Evaluate a Denoiser from flow coordinates: returns (x_model, x0, eps) at schedule index i."""

    def __init__(self, denoiser, ts, s, cond, guidance):
        self.den, self.ts, self.s = denoiser, ts, s
        self.cond, self.guidance = cond, guidance
        self.scale = _to_model_scale(denoiser.process, ts, s)

    def __call__(self, x_f: torch.Tensor, i: int):
        c = float(self.scale[i])
        x_m = x_f * c
        t = self.ts[i].to(x_f.dtype).expand(x_f.shape[0])
        x0 = self.den(x_m, t, self.cond, self.guidance)
        s = float(self.s[i])
        eps = (x_f - (1.0 - s) * x0) / s
        return x_m, x0, eps


@torch.no_grad()
def sample(
    denoiser,
    noise: torch.Tensor,
    *,
    steps: int | None = None,
    timesteps=None,
    solver: str = "heun",
    spacing: str = "uniform",
    cond=None,
    guidance=1.0,
    capture: bool = False,
    renoise: str = "fresh",
    seeds=None,
):
    """Sample from `denoiser` starting at unit Gaussian `noise`; returns x0 or a Trajectory.

    The initial state is prior_std(t0) * noise at the first time t0; the path ends at clean data
    after the last time. `timesteps` (decreasing model times) overrides `steps` and `spacing`.
    solver "fewstep" runs `sample_fewstep` (with `renoise` and per-sample `seeds`).
    """
    check_solver(solver)
    process = denoiser.process
    ts = _resolve_timesteps(process, steps, timesteps, spacing)
    if solver == "fewstep":
        return sample_fewstep(denoiser, noise, ts, cond=cond, guidance=guidance, renoise=renoise, seeds=seeds,
                              capture=capture)
    s = flow_time(process, ts)
    s_next = torch.cat([s[1:], torch.zeros(1, dtype=s.dtype)])
    model = _Model(denoiser, ts, s, cond, guidance)
    n = ts.numel()

    x_m = float(process.prior_std(ts[0])) * noise
    x_f = x_m / float(model.scale[0])
    xs, x0s = [], []
    old_x0, h_prev = None, None
    for i in range(n):
        x_m, x0, eps = model(x_f, i)
        if capture:
            xs.append(x_m)
            x0s.append(x0)
        si, sn = float(s[i]), float(s_next[i])
        if solver == "euler" or sn == 0.0:
            x_f = (1.0 - sn) * x0 + sn * eps  # the exact Euler/DDIM step in these coordinates
        elif solver == "heun":
            v = eps - x0
            x_pred = x_f + (sn - si) * v
            _, x0_2, eps_2 = model(x_pred, i + 1)
            x_f = x_f + (sn - si) * 0.5 * (v + (eps_2 - x0_2))
        else:  # dpm++2m
            lam_i = torch.log(torch.tensor((1.0 - si) / si, dtype=torch.float64)) if si < 1.0 else None
            lam_n = torch.log(torch.tensor((1.0 - sn) / sn, dtype=torch.float64))
            h = float(lam_n - lam_i) if lam_i is not None else float("inf")
            if old_x0 is None or h_prev is None or not (h_prev < float("inf")):
                d = x0
            else:
                r = h_prev / h
                d = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * old_x0
            # x_{i+1} = (sigma_n / sigma_i) x_i - alpha_n (e^{-h} - 1) D
            ratio = sn / si
            x_f = ratio * x_f + (1.0 - sn) * (1.0 - torch.exp(torch.tensor(-h)).item()) * d
            old_x0, h_prev = x0, h
    if not capture:
        return x_f
    xs.append(x_f)
    return Trajectory(x=x_f, xs=torch.stack(xs), ts=ts, x0s=torch.stack(x0s))


@torch.no_grad()
def sample_fewstep(
    denoiser,
    noise: torch.Tensor,
    timesteps,
    *,
    cond=None,
    guidance=1.0,
    renoise: str = "fresh",
    seeds=None,
    capture: bool = False,
):
    """Few-step student sampling: x0 = D(x_{t_i}, t_i), then re-noise onto t_{i+1}.

    renoise="fresh": x_{t_{i+1}} = alpha x0 + sigma z with new noise z (multistep consistency
    sampling, Song et al. 2023); "deterministic": z = the eps implied by the current prediction
    (DDIM-style, as TDM samples). Fresh noise is drawn per sample from `seeds` when given.
    """
    if renoise not in RENOISE:
        raise FewstepError(f"unknown renoise {renoise!r}; allowed: {', '.join(RENOISE)}")
    process = denoiser.process
    ts = _resolve_timesteps(process, None, timesteps, "uniform")
    n = ts.numel()
    x = float(process.prior_std(ts[0])) * noise
    xs, x0s = [], []
    for i in range(n):
        t = ts[i].to(x.dtype).expand(x.shape[0])
        x0 = denoiser(x, t, cond, guidance)
        if capture:
            xs.append(x)
            x0s.append(x0)
        if i == n - 1:
            x = x0
            break
        a_n, s_n = float(process.alpha(ts[i + 1])), float(process.sigma(ts[i + 1]))
        if renoise == "fresh":
            if seeds is not None:
                z = noise_for_seeds(seeds, x.shape[1:], dtype=x.dtype, device=x.device, stream=i + 1)
            else:
                z = torch.randn_like(x)
        else:
            a_i, s_i = float(process.alpha(ts[i])), float(process.sigma(ts[i]))
            z = (x - a_i * x0) / s_i
        x = a_n * x0 + s_n * z
    if not capture:
        return x
    xs.append(x)
    return Trajectory(x=x, xs=torch.stack(xs), ts=ts, x0s=torch.stack(x0s))
