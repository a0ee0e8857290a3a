"""Straightness of a model's ODE paths (Liu et al. 2023, "Flow straight and fast", eq. 5).

    S = E_z int_0^1 || (z_f - x) / s_0 - v(x_s, s) ||^2 ds / s_0

in the sampler engine's flow coordinates (flow time s = r / (1 + r), state x_f = x_t / (alpha + sigma),
velocity v = eps_hat - x0_hat; for a rectified-flow model s_0 = 1 and z_f = z, so the straight velocity is
z - x): the mean squared gap between the velocity the model follows along its own path and the constant
velocity of the straight line from its start to where it lands. 0 for an exactly straight flow (one Euler
step is then exact). The integral is the model's own Euler path with `steps` steps (velocities at the step
starts, weighted by the step lengths); the norm is averaged over the data dimensions (as in Lee et al.
2024's code), so numbers compare across data sizes.
"""

from __future__ import annotations

import torch

from fewstep.errors import FewstepError
from fewstep.sampling.generation import model_device, model_dtype
from fewstep.sampling.seeds import noise_for_seeds, sample_seeds
from fewstep.sampling.solvers import flow_scale, flow_time, resolve_timesteps, sample

STRAIGHTNESS_SEED = 20230  # fixed noise, separate from pair and evaluation seeds


@torch.no_grad()
def trajectory_straightness(denoiser, noise: torch.Tensor, *, steps: int = 32, spacing: str = "uniform",
                            cond=None, guidance=1.0) -> torch.Tensor:
    """Per-sample straightness (B,) of the Euler paths that start at unit Gaussian `noise` (see module docstring)."""
    ts = resolve_timesteps(denoiser.process, int(steps), None, spacing)
    traj = sample(denoiser, noise, timesteps=ts, solver="euler", cond=cond, guidance=guidance, capture=True)
    s = flow_time(denoiser.process, ts)  # (n,) float64, decreasing
    c = flow_scale(denoiser.process, ts)
    work = torch.promote_types(noise.dtype, torch.float32)
    x = traj.x.to(work)  # clean: flow state = model state
    n = ts.numel()
    x_f0 = traj.xs[0].to(work) / float(c[0])
    straight = (x_f0 - x) / float(s[0])
    lengths = torch.cat([s[:-1] - s[1:], s[-1:]]) / s[0]  # step lengths in flow time, summing to 1
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for i in range(n):
        x_f = traj.xs[i].to(work) / float(c[i])
        v = (x_f - traj.x0s[i].to(work)) / float(s[i])  # eps_hat - x0_hat
        gap = (v - straight).flatten(1).pow(2).mean(1)
        total += float(lengths[i]) * gap.double()
    return total


@torch.no_grad()
def straightness(denoiser, num: int = 1024, *, steps: int = 32, spacing: str = "uniform",
                 seed: int = STRAIGHTNESS_SEED, guidance=1.0, labels=None, batch_size: int = 1024) -> float:
    """Mean straightness S over `num` paths from the per-sample seeded noise of `seed` (labels i % num_classes for
    class-conditional models, as `generate` does). Lower is straighter; 0 for a straight flow."""
    if denoiser.data_shape is None:
        raise FewstepError("the model does not record its data shape (denoiser.data_shape)")
    num, batch_size = int(num), int(batch_size)
    if num < 1 or batch_size < 1 or int(steps) < 1:
        raise FewstepError(f"need num, steps and batch_size >= 1, got {num}, {steps}, {batch_size}")
    if labels is None and denoiser.cond_kind == "class":
        labels = torch.arange(num) % int(denoiser.num_classes)
    dtype, device = model_dtype(denoiser), model_device(denoiser)
    was = denoiser.training
    denoiser.eval()
    total = 0.0
    try:
        for start in range(0, num, batch_size):
            n = min(batch_size, num - start)
            z = noise_for_seeds(sample_seeds(seed, start, n), denoiser.data_shape, dtype=dtype, device=device)
            cond = labels[start:start + n].to(device) if labels is not None else None
            total += float(trajectory_straightness(denoiser, z, steps=steps, spacing=spacing, cond=cond,
                                                   guidance=guidance).sum())
    finally:
        denoiser.train(was)
    return total / num


__all__ = ["STRAIGHTNESS_SEED", "straightness", "trajectory_straightness"]
