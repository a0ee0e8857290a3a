"""Stream many samples from a Denoiser in batches, reproducibly per sample."""

from __future__ import annotations

import torch

from fewstep.errors import FewstepError
from fewstep.sampling.seeds import noise_for_seeds, sample_seeds
from fewstep.sampling.solvers import check_solver, sample


def model_dtype(module: torch.nn.Module) -> torch.dtype:
    p = next(iter(module.parameters()), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def model_device(module: torch.nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def generate(
    denoiser,
    num: int,
    *,
    steps: int | None = 50,
    solver: str = "heun",
    spacing: str = "uniform",
    timesteps=None,
    seed: int = 0,
    batch_size: int = 1024,
    labels: torch.Tensor | None = None,
    guidance=1.0,
    renoise: str = "fresh",
    progress=None,
):
    """`num` samples and their labels (or None), drawn batch by batch.

    Sample i starts from the noise of seed i of `sample_seeds(seed, 0, num)` (and re-noises from the
    same per-sample streams), so the output does not depend on `batch_size`. For a class-conditional
    denoiser without `labels`, sample i gets label i % num_classes. `progress(n)` is called after
    each batch with the number of samples it made.
    """
    check_solver(solver)
    if denoiser.data_shape is None:
        raise FewstepError("the model does not record its data shape (denoiser.data_shape)")
    num = int(num)
    if labels is None and denoiser.cond_kind == "class":
        labels = torch.arange(num) % int(denoiser.num_classes)
    if labels is not None and labels.shape[0] != num:
        raise FewstepError(f"got {labels.shape[0]} labels for {num} samples")
    dtype, device = model_dtype(denoiser), model_device(denoiser)
    was_training = denoiser.training
    denoiser.eval()
    out = []
    try:
        for start in range(0, num, batch_size):
            count = min(batch_size, num - start)
            seeds = sample_seeds(seed, start, count)
            noise = noise_for_seeds(seeds, denoiser.data_shape, dtype=dtype, device=device)
            cond = labels[start:start + count].to(device) if labels is not None else None
            x = sample(denoiser, noise, steps=steps, timesteps=timesteps, solver=solver, spacing=spacing,
                       cond=cond, guidance=guidance, renoise=renoise, seeds=seeds)
            out.append(x.float().cpu())
            if progress is not None:
                progress(count)
    finally:
        denoiser.train(was_training)
    samples = torch.cat(out) if out else torch.empty((0, *denoiser.data_shape))
    return samples, labels
