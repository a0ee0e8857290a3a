"""Stream many samples from a Denoiser in batches, reproducibly per sample."""

from __future__ import annotations

import itertools

import torch

from fewstep.diffusion.processes import to_device
from fewstep.errors import FewstepError
from fewstep.sampling.seeds import (
    NOISE_STREAMS,
    noise_for_seeds,
    noise_from_generators,
    sample_generators,
    sample_seeds,
)
from fewstep.sampling.solvers import check_renoise, check_solver, resolve_timesteps, sample


def _first_float_tensor(module: torch.nn.Module) -> torch.Tensor | None:
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def model_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype most of `module`'s floating parameters have (by count; a bf16 network whose time embedding stays
    fp32 is bf16), else that of its first floating buffer; float32 if it has none. The precision states are kept in
    while sampling it."""
    from fewstep.models.jvp import network_dtype

    dtype = network_dtype([module])
    if dtype is not None:
        return dtype
    p = _first_float_tensor(module)
    return p.dtype if p is not None else torch.float32


def model_device(module: torch.nn.Module) -> torch.device:
    """The device of the first floating parameter (or buffer) of `module`; the CPU if it has none."""
    p = _first_float_tensor(module)
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
    cond=None,
    noise_stream: str | None = None,
    decode=None,
    cond_index: torch.Tensor | None = None,
):
    """`num` samples and their labels (or None), drawn batch by batch.

    Sample i starts from the noise of seed i of `sample_seeds(seed, 0, num)` (and re-noises from the
    same per-sample streams), so the output does not depend on `batch_size`. For a class-conditional
    denoiser without `labels`, sample i gets label i % num_classes. `guidance` is a float or a (num,)
    tensor. `progress(n)` is called after each batch with the number of samples it made. Samples come
    back on the CPU in at least float32. `cond`: per-sample conditions other than labels (a tensor or a
    dict of tensors with `num` rows, e.g. text embeddings). `noise_stream`: "hashed" or "sequential"
    (see fewstep.sampling.seeds; default: the model's meta["noise_stream"], else hashed). `decode`: applied to each
    batch of samples on the model's device before it moves to the CPU (a latent model's VAE decode, batched like
    the sampling).
    """
    check_solver(solver)
    check_renoise(renoise)
    if denoiser.data_shape is None:
        raise FewstepError("the model does not record its data shape (denoiser.data_shape)")
    num, batch_size = int(num), int(batch_size)
    if num < 0 or batch_size < 1:
        raise FewstepError(f"need num >= 0 and batch_size >= 1, got num={num}, batch_size={batch_size}")
    timesteps = resolve_timesteps(denoiser.process, steps, timesteps, spacing)
    if labels is None and denoiser.cond_kind == "class":
        labels = torch.arange(num) % int(denoiser.num_classes)
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape[0] != num:
            raise FewstepError(f"got {labels.shape[0]} labels for {num} samples")
    if cond is not None and labels is not None:
        raise FewstepError("give labels or cond, not both")
    if cond is not None:
        rows = next(iter(cond.values())).shape[0] if isinstance(cond, dict) else cond.shape[0]
        if cond_index is not None:
            cond_index = torch.as_tensor(cond_index, dtype=torch.long)
            if cond_index.shape != (num,) or (num and not 0 <= int(cond_index.min()) <= int(cond_index.max()) < rows):
                raise FewstepError(f"cond_index must hold {num} rows in 0..{rows - 1}")
        elif rows != num:
            raise FewstepError(f"got conditions for {rows} samples, need {num}")
    stream = noise_stream or denoiser.meta.get("noise_stream", "hashed")
    if stream not in NOISE_STREAMS:
        raise FewstepError(f"unknown noise stream {stream!r}; allowed: {', '.join(NOISE_STREAMS)}")
    per_sample_guidance = isinstance(guidance, torch.Tensor) and guidance.ndim == 1
    if per_sample_guidance and guidance.shape[0] != num:
        raise FewstepError(f"got {guidance.shape[0]} guidance scales for {num} samples")
    dtype, device = model_dtype(denoiser), model_device(denoiser)
    was_training = denoiser.training
    denoiser.eval()
    out = []
    try:
        for start in range(0, num, batch_size):
            count = min(batch_size, num - start)
            seeds = sample_seeds(seed, start, count)
            if stream == "sequential":
                seeds = sample_generators(seeds)
                noise = noise_from_generators(seeds, denoiser.data_shape, dtype=dtype, device=device)
            else:
                noise = noise_for_seeds(seeds, denoiser.data_shape, dtype=dtype, device=device)
            if cond is not None:
                c = _rows(cond, start, count, device, cond_index)
            else:
                c = to_device(labels[start:start + count], device) if labels is not None else None
            w = to_device(guidance[start:start + count], device) if per_sample_guidance else guidance
            x = sample(denoiser, noise, timesteps=timesteps, solver=solver, cond=c, guidance=w,
                       renoise=renoise, seeds=seeds)
            if decode is not None:
                x = decode(x)
            out.append(x.to(torch.promote_types(x.dtype, torch.float32)).cpu())
            if progress is not None:
                progress(count)
    finally:
        denoiser.train(was_training)
    if out:
        return torch.cat(out), labels
    return (torch.empty((0, *denoiser.data_shape)) if decode is None else torch.empty((0,))), labels


def _rows(cond, start: int, count: int, device, index=None):
    pick = slice(start, start + count) if index is None else index[start:start + count]
    if isinstance(cond, dict):
        return {k: to_device(v[pick], device) for k, v in cond.items()}
    return to_device(cond[pick], device)
