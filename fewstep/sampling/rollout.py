"""The few-step rollout: the one path a few-step student samples along, shared by the student sampler
(`sample_fewstep`), DMD2's backward simulation and TDM's trajectory.

    x0_i = D(x_i, t_i),    x_{i+1} = alpha(t_{i+1}) x0_i + sigma(t_{i+1}) z_i,

with z_i fresh Gaussian noise (multistep consistency sampling, Song et al. 2023; DMD2's backward simulation)
or the noise implied by the prediction, z_i = (x_i - alpha(t_i) x0_i) / sigma(t_i) ("deterministic": DDIM,
Song et al. 2021, the path TDM trains on). After the last noisy time the path lands on clean data: the result is
the last prediction x0_{n-1}.

Times are shared by the batch, (n,), or per sample, (B, n) (TDM: each sample on the grid of its own step
count). A per-sample `stop` moves sample b only while i < stop[b]: the network is called on the samples still
moving, and each sample ends at its own state x_{stop[b]}. With shared times the coefficients are Python floats
(so a half-precision state is scaled as a plain scalar would scale it); per-sample ones are float32 columns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fewstep.diffusion.processes import NoiseProcess, expand_like
from fewstep.errors import check_choice

RENOISE = ("fresh", "deterministic")

# model(x, t, rows) -> x0 at the samples `rows` (None: the whole batch); t: their float64 CPU times, a 0-d tensor
# for shared times or (len(rows),) per sample
Model = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# fresh(i, x, rows) -> the fresh noise z_i of step i (into t_{i+1}) for the samples `rows` (None: all), like x
FreshNoise = Callable[[int, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class Rollout:
    """x: the final states (clean samples after a full path, else each sample's state at its stop);
    xs / x0s: with capture (not with per-sample stops), the states x_0..x_m and the predictions x0_0..x0_{m-1}."""

    x: torch.Tensor
    xs: list[torch.Tensor] = field(default_factory=list)
    x0s: list[torch.Tensor] = field(default_factory=list)


def rollout(process: NoiseProcess, model: Model, x: torch.Tensor, times: torch.Tensor, *, renoise: str = "fresh",
            fresh: FreshNoise | None = None, steps: int | None = None, stop: torch.Tensor | None = None,
            capture: bool = False) -> Rollout:
    """Run the few-step path from the states `x` at times[..., 0] (module docstring).

    `times`: float64 CPU, (n,) or (B, n), decreasing and noisy (entries a sample never steps into, past its
    stop, are not read). `steps`: run steps 0..steps-1 only (default n:
    the full path to clean data); a step into times[..., n] is never taken, the n-th step lands on x0. `stop`:
    (B,) step counts per sample (the rollout then runs max(stop) steps, each sample its own). `fresh` is needed
    for renoise="fresh". `x` is not modified.
    """
    check_choice("renoise", renoise, RENOISE)
    if capture and stop is not None:
        raise ValueError("capture needs every sample on the same step: use steps, not stop")
    per_sample = times.ndim == 2
    n = times.shape[-1]
    total = n if steps is None else int(steps)
    if stop is not None:
        total = int(stop.max()) if stop.numel() else 0
    if total > n:
        raise ValueError(f"a rollout over {n} times takes at most {n} steps, got {total}")
    if per_sample:
        alpha, sigma = process.alpha(times), process.sigma(times)  # (B, n) float64
    else:
        alpha, sigma = process.alpha(times).tolist(), process.sigma(times).tolist()
    out = Rollout(x=x)
    x = x.clone() if stop is not None else x
    if capture:
        out.xs.append(x)
    for i in range(total):
        rows = None
        if stop is not None:
            sel = torch.nonzero(stop > i).squeeze(1)
            rows = sel.to(x.device)
        xi = x if rows is None else x[rows]
        t = times[sel, i] if per_sample and rows is not None else times[..., i]
        x0 = model(xi, t, rows)
        last = i == n - 1
        if per_sample:
            cols = sel if rows is not None else slice(None)

            def col(v, like=xi):
                return expand_like(v.float().to(like.device), like)

            a_i, s_i = col(alpha[cols, i]), col(sigma[cols, i].clamp_min(1e-12))
            a_n = col(alpha[cols, i + 1]) if not last else None
            s_n = col(sigma[cols, i + 1]) if not last else None
        else:
            a_i, s_i = alpha[i], sigma[i]
            a_n, s_n = (alpha[i + 1], sigma[i + 1]) if not last else (None, None)
        if capture:
            out.x0s.append(x0)
        if last:
            nxt = x0
        else:
            z = fresh(i, xi, rows) if renoise == "fresh" else (xi - a_i * x0) / s_i
            nxt = a_n * x0 + s_n * z
        if rows is None:
            x = nxt
        else:
            x[rows] = nxt.to(x.dtype)
        if capture:
            out.xs.append(x)
    out.x = x
    return out
