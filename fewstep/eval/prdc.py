"""Kernel Inception Distance and k-NN precision/recall on feature sets (any feature space).

KID (Binkowski et al. 2018): the unbiased MMD^2 estimate with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets of equal size m from both sets (clean-fid and
torch-fidelity use 100 subsets of at most 1000):
MMD^2_u = [sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i,j} k(x_i, y_j) / m^2.

Precision/recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls around its
points with radius the distance to the point's k-th nearest neighbour in the same set (k = 3).
Precision is the fraction of generated points inside the real manifold; recall the fraction of real
points inside the generated one.
"""

from __future__ import annotations

import numpy as np
import torch

from fewstep.errors import FewstepError

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_K = 3


def _as_features(f, what: str, device=None) -> torch.Tensor:
    if isinstance(f, np.ndarray):
        f = torch.from_numpy(f)
    x = torch.as_tensor(f).detach().to(device or "cpu", torch.float64)
    if x.ndim != 2:
        raise FewstepError(f"{what} must be an (N, D) feature matrix, got shape {tuple(x.shape)}")
    return x


def kid(f1, f2, *, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = 0,
        device=None) -> dict:
    """KID between two (N, D) feature sets: {"value": mean over subsets, "std": their std, "subsets", "subset_size"}.

    Each subset draws m = min(N1, N2, subset_size) rows without replacement from each set
    (numpy Generator seeded with `seed`). Computed in float64 on `device` (default CPU).
    """
    x_all, y_all = _as_features(f1, "features", device), _as_features(f2, "reference features", device)
    if x_all.shape[1] != y_all.shape[1]:
        raise FewstepError(f"feature dimensions differ: {x_all.shape[1]} vs {y_all.shape[1]}")
    m = min(x_all.shape[0], y_all.shape[0], int(subset_size))
    if m < 2:
        raise FewstepError(f"KID needs at least 2 samples in each set, got {x_all.shape[0]} and {y_all.shape[0]}")
    if subsets < 1:
        raise FewstepError(f"KID needs at least one subset, got {subsets}")
    d = x_all.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(subsets)):
        x = x_all[torch.from_numpy(rng.choice(x_all.shape[0], m, replace=False)).to(x_all.device)]
        y = y_all[torch.from_numpy(rng.choice(y_all.shape[0], m, replace=False)).to(y_all.device)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        values.append(float(within - 2 * kxy.sum() / (m * m)))
    v = np.asarray(values)
    return {"value": float(v.mean()), "std": float(v.std()), "subsets": int(subsets), "subset_size": int(m)}


def _pairwise_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (float64), clipped at 0 before the square root."""
    d2 = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d2.clamp_min(0).sqrt()


def knn_radii(f, k: int = PR_K, block: int = 1024, device=None) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (the point itself excluded), in blocks."""
    x = _as_features(f, "features", device)
    if x.shape[0] <= k:
        raise FewstepError(f"k-NN radii with k={k} need more than {k} points, got {x.shape[0]}")
    radii = []
    for i in range(0, x.shape[0], block):
        d = _pairwise_dist(x[i:i + block], x)
        # the k+1 smallest include the point itself at distance 0
        radii.append(torch.topk(d, k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _fraction_inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    inside = 0
    for i in range(0, points.shape[0], block):
        d = _pairwise_dist(points[i:i + block], centres)
        inside += int((d <= radii[None]).any(dim=1).sum())
    return inside / points.shape[0]


def precision_recall(real, fake, *, k: int = PR_K, block: int = 1024, device=None) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of `fake` against `real` features
    (float64 on `device`, default CPU; distances in row blocks of `block`)."""
    r, f = _as_features(real, "reference features", device), _as_features(fake, "features", device)
    if r.shape[1] != f.shape[1]:
        raise FewstepError(f"feature dimensions differ: {f.shape[1]} vs {r.shape[1]}")
    r_radii, f_radii = knn_radii(r, k, block, device), knn_radii(f, k, block, device)
    return {"precision": _fraction_inside(f, r, r_radii, block), "recall": _fraction_inside(r, f, f_radii, block),
            "k": int(k)}
