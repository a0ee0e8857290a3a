"""KID and k-NN precision/recall on cases with known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.eval.prdc import kid, knn_radii, precision_recall


def brute_force_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written as explicit double sums."""
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_constant_sets_closed_form():
    a, b = np.array([1.0, 2.0, 0.0]), np.array([0.0, 1.0, -1.0])
    x, y = np.tile(a, (5, 1)), np.tile(b, (5, 1))
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    res = kid(x, y, subsets=3, subset_size=4)
    assert res["value"] == pytest.approx(k(a, a) + k(b, b) - 2 * k(a, b), rel=1e-12)
    assert res["std"] == pytest.approx(0.0, abs=1e-9) and res["subset_size"] == 4 and res["subsets"] == 3


def test_kid_full_subset_equals_the_unbiased_estimator():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 4)), rng.normal(loc=0.5, size=(7, 4))
    # a subset of all 7 rows is a permutation: every subset gives the full-sample estimate
    res = kid(torch.from_numpy(x), y, subsets=5, subset_size=100)
    assert res["value"] == pytest.approx(brute_force_mmd2_unbiased(x, y), rel=1e-10)
    assert res["std"] == pytest.approx(0.0, abs=1e-10)


def test_kid_same_distribution_near_zero_and_shift_positive():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same = kid(x, y, subsets=20, subset_size=200, seed=0)["value"]
    shifted = kid(x, y + 1.0, subsets=20, subset_size=200, seed=0)["value"]
    assert abs(same) < 0.02 < shifted
    # seeded subsets: reproducible
    assert kid(x, y, subsets=4, subset_size=50, seed=3) == kid(x, y, subsets=4, subset_size=50, seed=3)
    with pytest.raises(FewstepError, match="at least 2"):
        kid(x[:1], y)
    with pytest.raises(FewstepError, match="dimensions differ"):
        kid(x, y[:, :3])


def test_knn_radii_match_sorted_distances():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(30, 5))
    d = np.linalg.norm(f[:, None] - f[None], axis=-1)
    expected = np.sort(d, axis=1)[:, 3]  # column 0 is the point itself
    np.testing.assert_allclose(knn_radii(f, 3, block=7).numpy(), expected, rtol=1e-10)
    with pytest.raises(FewstepError, match="more than 3"):
        knn_radii(f[:3], 3)


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(40, 8))
    assert precision_recall(real, real.copy()) == {"precision": 1.0, "recall": 1.0, "k": 3}
    far = real + 1000.0
    res = precision_recall(real, far)
    assert res["precision"] == 0.0 and res["recall"] == 0.0


def test_precision_recall_half_outside():
    """Half the fakes copy real points, half sit far away: precision 1/2. The fakes' manifold has balls
    of radius >= the k-th neighbour among the copies, so every real point near a copy is recalled."""
    rng = np.random.default_rng(4)
    real = rng.normal(size=(40, 4))
    fake = np.concatenate([real[:20], rng.normal(size=(20, 4)) + 500.0])
    res = precision_recall(real, fake, k=3, block=9)
    assert res["precision"] == pytest.approx(0.5)
    assert 0.5 <= res["recall"] <= 1.0  # the 20 copied points are recalled at least
    # mode collapse: fakes all at one real point -> recall falls to the points inside its tiny ball
    collapsed = np.repeat(real[:1], 40, axis=0)
    res = precision_recall(real, collapsed)
    assert res["precision"] == 1.0 and res["recall"] == pytest.approx(1 / 40)
