"""The shared sampler engine: ODE solvers and the few-step student sampler, for any Denoiser.

Solvers integrate the probability-flow ODE in rectified-flow coordinates, whatever the model's
own process: flow time s = r / (1 + r) with r = sigma(t) / alpha(t) (s = 1 is pure noise, s = 0
clean data) and state x_f = x_t (1 - s) / alpha(t) = x_t / (alpha(t) + sigma(t)) = (1 - s) x0 + s eps
(the second form needs no special case at pure noise, where alpha = 0). The velocity there is
dx_f/ds = eps_hat - x0_hat. The model is always called at its own (x_t, t); states are reported in
its own process. In these coordinates:
- Euler is DDIM (Song et al. 2021) and equals diffusers' Euler scheduler on VP models;
- Heun is the trapezoidal 2nd-order method, with a plain Euler last step to s = 0 (Karras et al. 2022);
- DPM-Solver++(2M) (Lu et al. 2022) uses alpha = 1 - s, sigma = s, lambda = log(alpha / sigma),
  first order on the first step and on the step to clean data (as k-diffusion does).

The solver state is kept in at least float32 (as diffusers' schedulers do); the model is called
in the dtype of `noise`. Nothing here disables autograd: gradients flow through a sampler when the
caller enables them (``generate`` runs under ``torch.no_grad``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fewstep.diffusion.processes import NoiseProcess, as_time
from fewstep.diffusion.timesteps import sampling_timesteps
from fewstep.errors import FewstepError, check_choice
from fewstep.sampling.rollout import RENOISE, rollout
from fewstep.sampling.seeds import noise_from_generators, renoise_for_seeds

ODE_SOLVERS = ("euler", "heun", "dpm++2m")
SOLVERS = ODE_SOLVERS + ("fewstep",)


@dataclass
class Trajectory:
    """A captured sampling path in the model's own process.

    x: final sample; xs: states (n + 1, B, ...) at ts[0..n-1] then the final sample; ts: the n model
    times; x0s: (n, B, ...) the x0 predictions made at each of those times (the first evaluation of
    each step).
    """

    x: torch.Tensor
    xs: torch.Tensor
    ts: torch.Tensor
    x0s: torch.Tensor


def flow_time(process: NoiseProcess, t) -> torch.Tensor:
    """s = r / (1 + r), the rectified-flow time with the same SNR as time t (1 where alpha = 0)."""
    r = process.ratio(as_time(t).to(torch.float64))
    return torch.where(torch.isinf(r), torch.ones_like(r), r / (1.0 + r))


def flow_scale(process: NoiseProcess, t) -> torch.Tensor:
    """c(t) = alpha(t) + sigma(t): the model's state is x_t = c(t) x_f (same x0, same eps)."""
    t = as_time(t).to(torch.float64)
    return process.alpha(t) + process.sigma(t)


def check_solver(solver: str) -> str:
    check_choice("solver", solver, SOLVERS)
    return solver


def check_renoise(renoise: str) -> str:
    check_choice("renoise", renoise, RENOISE)
    return renoise


def _as_times(timesteps) -> torch.Tensor:
    """float64 CPU times; Python numbers are read as float64 (not rounded through float32)."""
    if isinstance(timesteps, torch.Tensor):
        return timesteps.detach().to("cpu", torch.float64)
    return torch.as_tensor(timesteps, dtype=torch.float64)


def resolve_timesteps(process: NoiseProcess, steps=None, timesteps=None, spacing: str = "uniform") -> torch.Tensor:
    """The model times a sampler evaluates (float64, CPU): explicit `timesteps`, else `steps` with `spacing`.

    They must be strictly decreasing and noisy (sigma > 0): the path to clean data after the last
    one is added by the sampler.
    """
    if timesteps is not None:
        ts = _as_times(timesteps).flatten()
        if ts.numel() < 1:
            raise FewstepError("timesteps must not be empty")
        if ts.numel() > 1 and not bool(torch.all(ts[1:] < ts[:-1])):
            raise FewstepError(f"timesteps must be strictly decreasing, got {ts.tolist()}")
    else:
        if steps is None:
            raise FewstepError("give steps or timesteps")
        ts = sampling_timesteps(process, int(steps), spacing)
    if not bool(torch.all(flow_time(process, ts) > 0)):
        raise FewstepError(
            f"timesteps must all be noisy (sigma > 0); got {ts.tolist()}: the sampler itself ends at clean data "
            "after the last one, so leave the clean time out"
        )
    return ts


def _model_time(ts: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
    # times stay at least fp32: bf16 would round a VP timestep like 999 to 1000
    return ts[i].to(torch.promote_types(x.dtype, torch.float32)).expand(x.shape[0])


def step_count_kwargs(denoiser, n: int) -> dict:
    """{"steps": n} for students that take the sampling step count as an input (TDM's sampling-steps-aware
    ones), else {}: every call of an n-step sampler (Heun's corrector included) tells them n."""
    from fewstep.models.trigflow import unwrap_model

    return {"steps": int(n)} if getattr(unwrap_model(denoiser), "steps_embedded", False) else {}


class _FlowModel:
    """The Denoiser seen from flow coordinates: (x_model, x0_hat, eps_hat) at schedule index i.

    Times shared by the batch, (n,), give Python-float flow times and scales (`s`, `c`); per-sample times,
    (n, B), give (B, 1, ...) columns in the solver's working dtype on the state's device (`like`)."""

    def __init__(self, denoiser, ts: torch.Tensor, cond, guidance, model_dtype: torch.dtype, steps_kw=None,
                 like: torch.Tensor | None = None):
        self.denoiser, self.ts = denoiser, ts
        self.per_sample = ts.ndim == 2
        if self.per_sample:
            shape = (-1,) + (1,) * (like.ndim - 1)
            work = torch.promote_types(like.dtype, torch.float32)
            s_all = flow_time(denoiser.process, ts).to(like.device, work)
            c_all = flow_scale(denoiser.process, ts).to(like.device, work)
            self.s = [s_all[i].reshape(shape) for i in range(ts.shape[0])]
            self.c = [c_all[i].reshape(shape) for i in range(ts.shape[0])]
        else:
            self.s = flow_time(denoiser.process, ts).tolist()
            self.c = flow_scale(denoiser.process, ts).tolist()
        self.cond, self.guidance, self.model_dtype = cond, guidance, model_dtype
        self.steps_kw = steps_kw or {}  # the sampler's step count, for step-count-embedded students

    def __call__(self, x_f: torch.Tensor, i: int):
        x_m = (x_f * self.c[i]).to(self.model_dtype)
        if self.per_sample:
            t = self.ts[i].to(x_m.device, torch.promote_types(x_m.dtype, torch.float32))
        else:
            t = _model_time(self.ts, i, x_m)
        x0 = self.denoiser(x_m, t, self.cond, self.guidance, **self.steps_kw).to(x_f.dtype)
        s = self.s[i]
        eps = (x_f - (1.0 - s) * x0) / (s.clamp_min(1e-12) if self.per_sample else s)
        return x_m, x0, eps


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
    ts = resolve_timesteps(process, steps, timesteps, spacing)
    if solver == "fewstep":
        return sample_fewstep(denoiser, noise, ts, cond=cond, guidance=guidance, renoise=renoise, seeds=seeds,
                              capture=capture)
    model = _FlowModel(denoiser, ts, cond, guidance, noise.dtype, step_count_kwargs(denoiser, ts.numel()))
    work = torch.promote_types(noise.dtype, torch.float32)
    x_f = noise.to(work) * (float(process.prior_std(ts[0])) / model.c[0])
    xs, x0s = ([], []) if capture else (None, None)
    x_f = _integrate(model, x_f, model.s + [0.0], solver, xs, x0s)
    x = x_f.to(noise.dtype)
    if not capture:
        return x
    xs.append(x)
    return Trajectory(x=x, xs=torch.stack(xs), ts=ts, x0s=torch.stack(x0s).to(noise.dtype))


def _integrate(model: _FlowModel, x_f: torch.Tensor, s: list, solver: str, xs=None, x0s=None):
    """Integrate the flow ODE in flow coordinates over the flow times `s` (len n + 1); returns x_f at s[n].

    `s` holds Python floats (times shared by the batch) or (B, 1, ...) columns (per sample: Euler, Heun, and
    DPM-Solver++(2M) for one step, where it is the Euler step). The model is evaluated at schedule indices
    0..n-1, and at i + 1 by Heun's corrector where s[i+1] > 0 (per sample: the corrector's result is kept only
    for the samples whose next time is noisy; the others take the plain Euler step).
    """
    x0_prev, h_prev = None, None
    for i in range(len(s) - 1):
        x_m, x0, eps = model(x_f, i)
        if xs is not None:
            xs.append(x_m)
            x0s.append(x0)
        si, sn = s[i], s[i + 1]
        shared = not isinstance(sn, torch.Tensor)
        if solver == "euler" or (shared and sn == 0.0) or (not shared and solver == "dpm++2m"):
            # the exact Euler/DDIM step in these coordinates: x_f + (sn - si)(eps - x0)
            x_f = (1.0 - sn) * x0 + sn * eps
        elif solver == "heun":
            euler = None if shared else (1.0 - sn) * x0 + sn * eps
            if shared or bool(torch.any(sn > 0)):
                v = eps - x0
                _, x0_2, eps_2 = model(x_f + (sn - si) * v, i + 1)
                heun = x_f + (sn - si) * 0.5 * (v + (eps_2 - x0_2))
                x_f = heun if shared else torch.where(sn > 0, heun, euler)  # a clean endpoint: a plain Euler step
            else:
                x_f = euler
        else:  # dpm++2m: x_n = (sigma_n / sigma_i) x_i - alpha_n (e^{-h} - 1) D, h = lambda_n - lambda_i
            h = math.log((1.0 - sn) / sn) - (math.log((1.0 - si) / si) if si < 1.0 else -math.inf)
            if x0_prev is None or math.isinf(h_prev):
                d = x0  # first order (at pure noise h_prev is infinite: the limit r -> inf of the 2M formula)
            else:
                r = h_prev / h
                d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            x_f = (sn / si) * x_f - (1.0 - sn) * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
    return x_f


def ode_solve(denoiser, x: torch.Tensor, timesteps, *, solver: str = "heun", cond=None, guidance=1.0) -> torch.Tensor:
    """Integrate the teacher's probability-flow ODE from state `x` at timesteps[0] to timesteps[-1].

    `timesteps` are decreasing model times: shape (n + 1,), or (n + 1, B) for a different path per
    sample (Euler and Heun; DPM-Solver++(2M) for a single step, where it is Euler). All but the last
    must be noisy; the last may be clean (then the result is the clean sample). One step between two
    times is what consistency distillation needs. The result is the state at timesteps[-1] in the
    model's own process, in the dtype of `x`.
    """
    check_solver(solver)
    if solver == "fewstep":
        raise FewstepError("ode_solve needs an ODE solver (euler, heun, dpm++2m), not 'fewstep'")
    process = denoiser.process
    ts = _as_times(timesteps)
    if ts.ndim not in (1, 2) or ts.shape[0] < 2 or not bool(torch.all(ts[1:] < ts[:-1])):
        raise FewstepError(f"ode_solve needs at least 2 strictly decreasing times, got {ts.tolist()}")
    if not bool(torch.all(flow_time(process, ts[:-1]) > 0)):
        raise FewstepError(f"only the last time may be clean, got {ts.tolist()}")
    if ts.ndim == 2 and ts.shape[1] != x.shape[0]:
        raise FewstepError(f"per-sample timesteps have {ts.shape[1]} columns for a batch of {x.shape[0]}")
    if ts.ndim == 2 and solver == "dpm++2m" and ts.shape[0] > 2:
        raise FewstepError("per-sample timesteps support dpm++2m for one step only (it is Euler there)")
    work = torch.promote_types(x.dtype, torch.float32)
    model = _FlowModel(denoiser, ts, cond, guidance, x.dtype, like=x)
    x_f = _integrate(model, x.to(work) / model.c[0], model.s, solver)
    return (x_f * model.c[-1]).to(x.dtype)


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
    """Few-step student sampling along `fewstep.sampling.rollout`: x0 = D(x_{t_i}, t_i), then
    x_{t_{i+1}} = alpha x0 + sigma z.

    renoise="fresh": z is new Gaussian noise (multistep consistency sampling, Song et al. 2023),
    drawn per sample from `seeds` when given (so a sample does not depend on its batch; integer seeds
    give the hashed per-step streams, torch.Generators are drawn from in turn), else from the global
    generator; "deterministic": z = (x_{t_i} - alpha_i x0) / sigma_i, the eps implied by
    the current prediction (DDIM, Song et al. 2021, the same path as the Euler solver). The output
    is the last x0.
    """
    check_renoise(renoise)
    process = denoiser.process
    ts = resolve_timesteps(process, None, timesteps)
    n = ts.numel()
    if seeds is not None and len(seeds) != noise.shape[0]:
        raise FewstepError(f"got {len(seeds)} seeds for a batch of {noise.shape[0]} samples")
    # students that take the step count as an input (TDM's sampling-steps-aware ones) are told n
    steps_kw = step_count_kwargs(denoiser, n)

    def model(x, t, rows):
        return denoiser(x, t.to(torch.promote_types(x.dtype, torch.float32)).expand(x.shape[0]), cond, guidance,
                        **steps_kw).to(x.dtype)

    def fresh(i, x, rows):
        if seeds is not None and len(seeds) and isinstance(seeds[0], torch.Generator):
            return noise_from_generators(seeds, x.shape[1:], dtype=x.dtype, device=x.device)
        if seeds is not None:
            return renoise_for_seeds(seeds, i + 1, x.shape[1:], dtype=x.dtype, device=x.device)
        return torch.randn_like(x)

    path = rollout(process, model, noise * float(process.prior_std(ts[0])), ts, renoise=renoise, fresh=fresh,
                   capture=capture)
    if not capture:
        return path.x
    return Trajectory(x=path.x, xs=torch.stack(path.xs), ts=ts, x0s=torch.stack(path.x0s))
