"""Per-sample seeds: sample i gets the same noise whatever the batch it is drawn in."""

from __future__ import annotations

import torch

_MIX = 1_000_003  # a prime: seed s, index i -> s * _MIX + i (distinct for i < _MIX)
_STEP_MIX = 7_919


def sample_seeds(seed: int, start: int, count: int) -> list[int]:
    """The seeds of samples start..start+count-1 of a run with base `seed`."""
    return [(int(seed) * _MIX + start + i) % (2**63 - 1) for i in range(int(count))]


def noise_for_seeds(seeds, shape, dtype=torch.float32, device=None, stream: int = 0) -> torch.Tensor:
    """Unit Gaussian noise of shape (len(seeds), *shape), row i drawn from its own generator.

    `stream` selects an independent stream per seed (0: initial noise; k > 0: re-noise at step k).
    """
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed((int(s) + stream * _STEP_MIX * _MIX) % (2**63 - 1))
        rows.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
    out = torch.stack(rows) if rows else torch.empty((0, *shape))
    return out.to(device=device, dtype=dtype)
