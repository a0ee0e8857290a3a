"""The shared Frechet distance as FID uses it: closed forms, near-singular (N < D) covariances where
scipy's sqrtm and the eigenvalue forms are compared, the exact low-rank route, streaming statistics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

import fewstep.eval.digits as digits_metrics
import fewstep.eval.fid as fid_module
import fewstep.eval.frechet as frechet_module
from fewstep.errors import FewstepError
from fewstep.eval.fid import FeatureAccumulator
from fewstep.eval.frechet import feature_stats, frechet_distance, trace_sqrt_product


def test_fd_digits_and_fid_share_one_frechet_distance():
    assert fid_module.frechet_distance is frechet_module.frechet_distance
    assert digits_metrics.frechet_distance is frechet_module.frechet_distance
    import fewstep.eval as ev

    assert ev.frechet_distance is frechet_module.frechet_distance


def test_one_dimensional_gaussians():
    # W2^2(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([0.5], [[9.0]], [-1.0], [[0.25]]) == pytest.approx(1.5**2 + 2.5**2, rel=1e-13)


def test_diagonal_covariances_in_high_dimension():
    rng = np.random.default_rng(0)
    d = 300
    a, b = rng.uniform(0, 2, d), rng.uniform(0, 2, d)
    a[:100] = 0.0  # singular on a 100-d subspace
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def _exact_trace_sqrt_low_rank(g: np.ndarray, s2: np.ndarray) -> float:
    """Tr (S1 S2)^{1/2} for S1 = G^T G through the small k x k matrix, with eigvalsh in float64."""
    w = np.linalg.eigvalsh(g @ s2 @ g.T)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def test_near_singular_scipy_vs_eigen_forms():
    """10 samples in 256-d (rank 9) against a full-rank reference: both eigenvalue routes agree with the
    exact low-rank value; scipy's sqrtm of the non-symmetric product is no closer than they are."""
    rng = np.random.default_rng(5)
    d, n = 256, 10
    f1 = rng.normal(size=(n, d)) * rng.uniform(0.1, 2.0, d)
    f2 = rng.normal(size=(2000, d))
    mu1, s1 = feature_stats(f1)
    mu2, s2 = feature_stats(f2)
    g = (f1 - f1.mean(0)) / np.sqrt(n - 1)
    exact = _exact_trace_sqrt_low_rank(g, s2)
    full = trace_sqrt_product(s1, s2)
    low = trace_sqrt_product(None, s2, factor1=g)
    assert low == pytest.approx(exact, rel=1e-12, abs=1e-6)  # the one zero eigenvalue: sqrt(+-1e-15)
    # the full D x D route adds square roots of ~1e-16 round-off eigenvalues (about D * 1e-8 in all)
    assert full == pytest.approx(exact, rel=1e-5, abs=d * 1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sq = scipy.linalg.sqrtm(s1 @ s2)
    scipy_trace = float(np.real(np.trace(sq)))
    assert abs(low - exact) <= abs(scipy_trace - exact) + 1e-9
    # frechet_distance picks the low-rank route from a factor and agrees with the full route
    fd_low = frechet_distance(mu1, s1, mu2, s2, factor1=g)
    fd_full = frechet_distance(mu1, s1, mu2, s2)
    assert fd_low == pytest.approx(fd_full, rel=1e-6)
    assert fd_low == pytest.approx(frechet_distance(mu2, s2, mu1, s1, factor2=g), rel=1e-12)


def test_identical_small_sets_give_zero_with_the_factor():
    rng = np.random.default_rng(6)
    f = rng.normal(size=(8, 2048)) + 3.0
    acc = FeatureAccumulator()
    acc.add(f)
    g = acc.covariance_factor()
    value = frechet_distance(acc.mean(), acc.cov(), acc.mean(), acc.cov(), factor1=g, factor2=g)
    assert value == pytest.approx(0.0, abs=1e-9)


def test_rank_one_lines_closed_form_with_factor():
    # S1 = v v^T, S2 = w w^T: Tr (S1 S2)^{1/2} = |<v, w>|
    rng = np.random.default_rng(7)
    v, w = rng.normal(size=50), rng.normal(size=50)
    z = np.zeros(50)
    expected = v @ v + w @ w - 2 * abs(v @ w)
    got = frechet_distance(z, np.outer(v, v), z, np.outer(w, w), factor1=v[None])
    assert got == pytest.approx(expected, rel=1e-12)
    with pytest.raises(FewstepError, match="factor"):
        frechet_distance(z, np.outer(v, v), z, np.outer(w, w), factor1=np.ones((1, 3)))


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_streaming_statistics_equal_all_at_once(batch):
    rng = np.random.default_rng(8)
    f = rng.normal(size=(100, 12)) @ rng.normal(size=(12, 12)) + 50.0  # large mean, small spread
    acc = FeatureAccumulator(keep_features=True)
    for i in range(0, len(f), batch):
        acc.add(torch.from_numpy(f[i:i + batch]))
    mu, s = feature_stats(f)
    np.testing.assert_allclose(acc.mean(), mu, rtol=1e-13)
    np.testing.assert_allclose(acc.cov(), s, rtol=1e-10, atol=1e-12)
    assert acc.n == 100 and acc.features().shape == (100, 12)
    assert acc.covariance_factor() is None  # 100 samples > 12 dims: the full route is cheaper
    small = FeatureAccumulator()
    for i in range(0, 10, batch):
        small.add(f[i:min(i + batch, 10)])
    g = small.covariance_factor()
    np.testing.assert_allclose(g.T @ g, feature_stats(f[:10])[1], rtol=1e-10, atol=1e-10)
    assert small.features() is None


def test_accumulator_input_checks():
    acc = FeatureAccumulator()
    with pytest.raises(FewstepError, match="no features"):
        acc.mean()
    acc.add(np.ones((1, 4)))
    with pytest.raises(FewstepError, match="at least 2"):
        acc.cov()
    with pytest.raises(FewstepError, match="dimension changed"):
        acc.add(np.ones((2, 5)))
