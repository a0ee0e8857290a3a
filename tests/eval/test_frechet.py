"""The shared Frechet distance: closed forms, identical sets, near-singular covariances, scipy agreement."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fewstep.errors import FewstepError
from fewstep.eval.frechet import feature_stats, frechet_distance, frechet_distance_features, trace_sqrt_product


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's general matrix square root (reliable when well conditioned)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.real(np.trace(covmean)))


def random_spd(rng, d, floor=0.5):
    a = rng.normal(size=(d, d))
    return a @ a.T + floor * np.eye(d)


@pytest.mark.parametrize("m1,s1,m2,s2", [(1.0, 2.0, -2.0, 0.5), (0.0, 1.0, 0.0, 1.0), (3.0, 0.1, 3.5, 4.0)])
def test_one_dimensional_closed_form(m1, s1, m2, s2):
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) = (m1 - m2)^2 + (s1 - s2)^2
    expected = (m1 - m2) ** 2 + (s1 - s2) ** 2
    assert frechet_distance([m1], [[s1 * s1]], [m2], [[s2 * s2]]) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_commuting_diagonal_covariances():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # the same pair in a rotated basis (still commuting): the distance is rotation invariant
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-10)


def test_rank_deficient_covariances():
    """Rank-1 covariances S1 = v v^T, S2 = w w^T: Tr (S1 S2)^{1/2} = |<v, w>|."""
    u = np.array([3.0, 4.0, 0.0]) / 5.0
    zero = np.zeros(3)
    # the same line: the 1-D answer along it
    assert frechet_distance(zero, 4.0 * np.outer(u, u), zero, np.outer(u, u)) == pytest.approx(1.0, abs=1e-10)
    # orthogonal lines: the product is 0 (round-off eigenvalues ~1e-16 add their square roots, ~1e-8)
    v = np.array([-4.0, 3.0, 0.0]) / 5.0
    assert frechet_distance(zero, 4.0 * np.outer(u, u), zero, np.outer(v, v)) == pytest.approx(5.0, abs=1e-6)
    # lines at a general angle: |v|^2 + |w|^2 - 2 |<v, w>|
    rng = np.random.default_rng(0)
    v, w = rng.normal(size=3), rng.normal(size=3)
    expected = v @ v + w @ w - 2 * abs(v @ w)
    assert frechet_distance(zero, np.outer(v, v), zero, np.outer(w, w)) == pytest.approx(expected, rel=1e-7)


def test_identical_stats_give_zero_and_symmetry():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 20)) @ rng.normal(size=(20, 20))
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-8)
    mu, s = feature_stats(f)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)
    g = rng.normal(size=(400, 20)) + 0.3
    assert frechet_distance_features(f, g) == pytest.approx(frechet_distance_features(g, f), rel=1e-9)
    assert frechet_distance_features(f, g) > 0


def test_near_singular_features_stay_accurate():
    """64-d features with 10 samples (rank-9 covariances): 0 against itself; agrees with a well-posed shift."""
    rng = np.random.default_rng(1)
    f = rng.normal(size=(10, 64))
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-7)
    # a pure translation changes only the mean term, however singular the covariance is
    shift = rng.normal(size=64)
    assert frechet_distance_features(f, f + shift) == pytest.approx(shift @ shift, rel=1e-7)
    assert np.isfinite(frechet_distance_features(f, rng.normal(size=(10, 64))))


def test_feature_stats_unbiased_and_torch_input():
    f = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 1.0]])
    mu, s = feature_stats(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(s, np.cov(f.T, ddof=1))
    assert s[0, 0] == pytest.approx(4.0)  # sum of squares 8 over N - 1 = 2
    mu_t, s_t = feature_stats(torch.tensor(f, dtype=torch.float32))
    np.testing.assert_allclose(s_t, s, rtol=1e-6)
    assert s_t.dtype == np.float64
    assert feature_stats(np.arange(5.0)[:, None])[1].shape == (1, 1)  # 1-D features stay a matrix


def test_bad_inputs():
    with pytest.raises(FewstepError, match="N >= 2"):
        feature_stats(np.zeros((1, 3)))
    with pytest.raises(FewstepError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), d=st.integers(1, 10))
def test_matches_scipy_sqrtm_on_well_conditioned_spd(seed, d):
    rng = np.random.default_rng(seed)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected_trace = float(np.real(np.trace(scipy.linalg.sqrtm(s1 @ s2))))
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected_trace, rel=1e-8)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-7, abs=1e-8)
    assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9, abs=1e-10)
