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
from fewstep.errors import FewstepError

MAX_POINTS = 4096


def as_points(x) -> torch.Tensor:
    """A (N, D) float64 tensor from a tensor or array (images are flattened)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().to(torch.float64).cpu()
    if t.ndim == 0:
        raise FewstepError("expected a set of points (N, D), got a scalar")
    return t.reshape(t.shape[0], -1)


def _point_pair(x, y, min_points: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets as (N, D) float64, checked for a common dimension and enough points."""
    x, y = as_points(x), as_points(y)
    if x.shape[1] != y.shape[1]:
        raise FewstepError(f"point sets of different dimension: {x.shape[1]} vs {y.shape[1]}")
    if min(x.shape[0], y.shape[0]) < min_points:
        raise FewstepError(f"need at least {min_points} points in each set, got {x.shape[0]} and {y.shape[0]}")
    return x, y


def _subsample(x: torch.Tensor, max_points: int, seed: int) -> torch.Tensor:
    """At most max_points rows, chosen by a seeded permutation (the same rows for equal-size sets)."""
    if x.shape[0] <= max_points:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
    return x[idx]


def _w1_sorted(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact W1 between the empirical distributions of each row of a (P, n) and b (P, m), both sorted.

    W1 = int_0^1 |F_a^{-1}(q) - F_b^{-1}(q)| dq; both quantile functions are constant between the
    merged breakpoints {i/n} U {j/m}, so the integral is a weighted sum over those intervals.
    """
    n, m = a.shape[1], b.shape[1]
    if n == m:
        return (a - b).abs().mean(dim=1)
    breaks, _ = torch.sort(torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                                      torch.arange(1, m + 1, dtype=torch.float64) / m]))
    widths = torch.diff(breaks, prepend=breaks.new_zeros(1))
    mid = breaks - widths / 2
    ia = torch.clamp((mid * n).long(), max=n - 1)
    ib = torch.clamp((mid * m).long(), max=m - 1)
    return ((a[:, ia] - b[:, ib]).abs() * widths).sum(dim=1)


def sliced_wasserstein(x, y, num_projections: int = 256, seed: int = 0) -> float:
    """SW1(x, y) = E_theta W1(<theta, x>, <theta, y>), averaged over `num_projections` unit directions.

    (Rabin et al. 2011.) The directions come from a generator seeded with `seed`, so the value is
    deterministic. Each 1-D W1 is exact by quantile matching, also for sets of different sizes
    (merged quantile breakpoints). No subsampling is needed: the cost is O(N log N) per direction.
    """
    x, y = _point_pair(x, y)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(num_projections, x.shape[1], generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=1, keepdim=True)
    px = torch.sort(dirs @ x.T, dim=1)[0]  # (P, N): sort along the contiguous axis
    py = torch.sort(dirs @ y.T, dim=1)[0]
    return float(_w1_sorted(px, py).mean())


def _rbf_sum(a: torch.Tensor, b: torch.Tensor, gamma: float) -> float:
    """sum_ij exp(-gamma |a_i - b_j|^2), one matrix at a time and in place (4096^2 float64 = 128 MB)."""
    k = torch.cdist(a, b).pow_(2).mul_(-gamma).exp_()
    return float(k.sum())


def median_bandwidth(x, y) -> float:
    """Median pairwise distance of the pooled set (the median heuristic; 2048 pooled points at most).

    Falls back to the mean positive distance when more than half the pairs coincide, and to 1.0
    when every point is the same.
    """
    z = torch.cat(_point_pair(x, y))
    d = torch.pdist(_subsample(z, 2048, 1))
    h = float(d.median()) if d.numel() else 0.0
    if h <= 0:
        pos = d[d > 0]
        h = float(pos.mean()) if pos.numel() else 1.0
    return h


def mmd_rbf(x, y, bandwidth: float | None = None, max_points: int = MAX_POINTS) -> float:
    """MMD^2 with k(a, b) = exp(-|a - b|^2 / (2 h^2)) (Gretton et al. 2012), the UNBIASED U-statistic.

    MMD^2_u = mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j); it can be
    slightly negative when the distributions agree. h is the median heuristic on the pooled set when
    `bandwidth` is None. Each set is subsampled deterministically to at most `max_points` points.
    """
    x, y = _point_pair(x, y, min_points=2)
    x, y = _subsample(x, max_points, 2), _subsample(y, max_points, 2)
    h = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise FewstepError(f"MMD bandwidth must be positive, got {bandwidth}")
    gamma = 1.0 / (2.0 * h * h)
    n, m = x.shape[0], y.shape[0]
    sxx = (_rbf_sum(x, x, gamma) - n) / (n * (n - 1))  # k(a, a) = 1 on the diagonal
    syy = (_rbf_sum(y, y, gamma) - m) / (m * (m - 1))
    return sxx + syy - 2 * _rbf_sum(x, y, gamma) / (n * m)


def energy_distance(x, y, max_points: int = MAX_POINTS) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo 2013), the V-statistic: exactly 0 for
    identical sets and >= 0 always (up to round-off). Sets are subsampled to `max_points` points."""
    x, y = _point_pair(x, y)
    x, y = _subsample(x, max_points, 4), _subsample(y, max_points, 4)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def mode_coverage(x, centers, std: float, radius_std: float = 3.0, min_fraction: float = 0.01) -> dict:
    """Fraction of samples assigned to each mode: nearest centre, and within radius_std * std of it.

    Returns "per_mode" (fractions of ALL samples, one per centre), "min_fraction", "max_fraction",
    "off_mode" (fraction farther than radius_std * std from every centre), "modes_covered" (modes
    holding at least `min_fraction` of all samples; default threshold 1%) and "num_modes". Exact
    samples of K equal modes give per_mode ~ 1/K and off_mode ~ 0 (0.01 for 2-D at 3 std).
    """
    x, c = _point_pair(x, centers)
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


def gaussians8_coverage(x, radius_std: float = 3.0, min_fraction: float = 0.01) -> dict:
    """`mode_coverage` for the built-in 8-Gaussians toy (radius 2, std 0.1)."""
    return mode_coverage(x, gaussians8_centers(), GAUSSIANS8_STD, radius_std, min_fraction)
