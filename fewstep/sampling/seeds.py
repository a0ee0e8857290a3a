"""Per-sample seeds: sample i gets the same noise whatever the batch it is drawn in.

Every sample owns a seed (``sample_seeds``); its initial noise comes from a torch.Generator seeded
with it, and the fresh noise a few-step sampler adds at step k from a generator seeded with a hash
of (seed, k). Noise is drawn in float32 on the CPU, then moved and cast, so a sample is also the
same whatever the device and dtype it is computed in (up to that dtype's rounding).

Diffusers teachers and their students use the "sequential" stream instead: sample i owns one CPU
generator seeded with its seed and draws its initial noise and then each step's fresh noise from it
in turn, which is what a stock diffusers pipeline does when called with
``generator=[torch.Generator().manual_seed(s) for s in seeds]`` (LCMScheduler, stochastic FlowMatch).
"""

from __future__ import annotations

import torch

from fewstep.diffusion.processes import to_device

_MIX = 1_000_003  # a prime: seed s, index i -> s * _MIX + i (distinct for i < _MIX)
_MASK64 = (1 << 64) - 1


def sample_seeds(seed: int, start: int, count: int) -> list[int]:
    """The seeds of samples start..start+count-1 of a run with base `seed`: seed * 1_000_003 + i."""
    return [(int(seed) * _MIX + int(start) + i) % (2**63 - 1) for i in range(int(count))]


def _splitmix64(z: int) -> int:
    """The splitmix64 finaliser (Steele et al. 2014): a bijective 64-bit integer hash."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def step_seed(seed: int, step: int) -> int:
    """The seed of the fresh noise sample `seed` receives at sampler step `step` >= 1."""
    return _splitmix64(_splitmix64(int(seed) & _MASK64) ^ int(step)) % (2**63 - 1)


def _draw(seeds, shape, dtype, device) -> torch.Tensor:
    shape = tuple(int(d) for d in shape)
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32) for s in seeds]
    out = torch.stack(rows) if rows else torch.empty((0, *shape))
    return to_device(out, device, dtype)  # no host sync on CUDA


def noise_for_seeds(seeds, shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """Unit Gaussian noise of shape (len(seeds), *shape); row i comes from its own generator seeded seeds[i]."""
    return _draw(seeds, shape, dtype, device)


NOISE_STREAMS = ("hashed", "sequential")


def sample_generators(seeds) -> list[torch.Generator]:
    """One CPU generator per sample seed, for the "sequential" noise stream."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def noise_from_generators(generators, shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """The next unit Gaussian draw of shape `shape` from each generator (row i from generators[i]), in float32
    on the CPU then cast: the rows a diffusers pipeline draws with `randn_tensor` and a list of generators."""
    shape = tuple(int(d) for d in shape)
    rows = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    out = torch.stack(rows) if rows else torch.empty((0, *shape))
    return to_device(out, device, dtype)  # no host sync on CUDA


def renoise_for_seeds(seeds, step: int, shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """The fresh noise of a few-step sampler at step `step` (>= 1), row i from ``step_seed(seeds[i], step)``."""
    return _draw([step_seed(s, step) for s in seeds], shape, dtype, device)
