"""Sample-based distances for 2-D (or any low-dimensional) point sets, and mode coverage.

- Sliced Wasserstein distance (Rabin et al. 2011): the mean over random unit directions of the 1-D
  Wasserstein-1 distance between the projected sets, by quantile matching (sets may differ in size).
- MMD^2 with an RBF kernel (Gretton et al. 2012), unbiased U-statistic; bandwidth by the median
  heuristic on the pooled set.
- Energy distance (Szekely & Rizzo 2013): 2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic).
The O(N^2) metrics subsample each set deterministically to at most `max_points` points.
"""

from __future__ import annotations

import numpy as np
import torch

from fewstep.data.toy import GAUSSIANS8_STD, gaussians8_centers

MAX_POINTS = 4096


def as_points(x) -> torch.Tensor:
    """A (N, D) float64 tensor from a tensor or array (images are flattened)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().to(torch.float64).cpu()
    return t.reshape(t.shape[0], -1)


def _subsample(x: torch.Tensor, max_points: int, seed: int) -> torch.Tensor:
    if x.shape[0] <= max_points:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
    return x[idx]


def _quantiles(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Empirical quantile function of each column of v (N, P) at levels q (the sorted-sample step function)."""
    s, _ = torch.sort(v, dim=0)
    idx = torch.clamp((q * v.shape[0]).long(), max=v.shape[0] - 1)
    return s[idx]


def sliced_wasserstein(x, y, num_projections: int = 256, seed: int = 0) -> float:
    """Mean over `num_projections` random directions of W1 between the projected samples."""
    x, y = as_points(x), as_points(y)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], num_projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    px, py = x @ dirs, y @ dirs
    if x.shape[0] == y.shape[0]:
        d = (torch.sort(px, dim=0)[0] - torch.sort(py, dim=0)[0]).abs().mean(0)
    else:
        n = max(x.shape[0], y.shape[0])
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        d = (_quantiles(px, q) - _quantiles(py, q)).abs().mean(0)
    return float(d.mean())


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b).pow(2)


def median_bandwidth(x, y) -> float:
    """Median pairwise distance of the pooled set (the median heuristic)."""
    z = torch.cat([as_points(x), as_points(y)])
    z = _subsample(z, 2048, 1)
    d = torch.cdist(z, z)
    return float(d[torch.triu(torch.ones_like(d, dtype=torch.bool), 1)].median())


def mmd_rbf(x, y, bandwidth: float | None = None, max_points: int = MAX_POINTS) -> float:
    """Unbiased MMD^2 with k(a, b) = exp(-|a - b|^2 / (2 h^2)); h from the median heuristic when None."""
    x = _subsample(as_points(x), max_points, 2)
    y = _subsample(as_points(y), max_points, 3)
    h = bandwidth or median_bandwidth(x, y)
    gamma = 1.0 / (2.0 * h * h)
    kxx = torch.exp(-gamma * _sq_dists(x, x))
    kyy = torch.exp(-gamma * _sq_dists(y, y))
    kxy = torch.exp(-gamma * _sq_dists(x, y))
    n, m = x.shape[0], y.shape[0]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())


def energy_distance(x, y, max_points: int = MAX_POINTS) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic; 0 for identical sets, >= 0 always)."""
    x = _subsample(as_points(x), max_points, 4)
    y = _subsample(as_points(y), max_points, 5)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def mode_coverage(x, centers, std: float, radius_std: float = 3.0, min_fraction: float = 0.01) -> dict:
    """Fraction of samples assigned to each mode: nearest centre, and within radius_std * std of it.

    Samples farther than that from every centre count as "off_mode". A mode is covered when it
    holds at least `min_fraction` of all samples.
    """
    x = as_points(x)
    c = as_points(centers)
    d = torch.cdist(x, c)
    dmin, k = d.min(dim=1)
    on = dmin <= radius_std * std
    counts = torch.bincount(k[on], minlength=c.shape[0]).to(torch.float64)
    frac = (counts / max(1, x.shape[0])).tolist()
    return {
        "per_mode": [round(f, 5) for f in frac],
        "min_fraction": round(min(frac), 5),
        "max_fraction": round(max(frac), 5),
        "off_mode": round(float((~on).double().mean()), 5),
        "modes_covered": int(sum(f >= min_fraction for f in frac)),
        "num_modes": int(c.shape[0]),
    }


def gaussians8_coverage(x, radius_std: float = 3.0) -> dict:
    """`mode_coverage` for the built-in 8-Gaussians toy (radius 2, std 0.1)."""
    return mode_coverage(x, gaussians8_centers(), GAUSSIANS8_STD, radius_std)
