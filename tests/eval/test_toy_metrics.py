"""Toy metrics: zero on identical sets, growing with distortion, telling distributions apart."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from fewstep.data import get_data
from fewstep.data.toy import gaussians8_centers
from fewstep.errors import FewstepError
from fewstep.eval import energy_distance, gaussians8_coverage, mmd_rbf, mode_coverage, sliced_wasserstein
from fewstep.eval.toy import _w1_sorted, median_bandwidth

CB = get_data("toy:checkerboard")


def test_identical_sets_score_zero():
    x = CB.reference(1024)[0]
    assert sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert abs(mmd_rbf(x, x)) < 1e-3  # unbiased estimate: ~0, may dip slightly below


@pytest.mark.parametrize("metric", [sliced_wasserstein, mmd_rbf, energy_distance])
def test_grows_with_shift(metric):
    x = CB.reference(1024)[0]
    y = CB.reference(1024, seed=5)[0]
    vals = [metric(x, y + torch.tensor([s, 0.0])) for s in (0.0, 0.5, 2.0)]
    assert vals[0] < 0.5 * vals[1] and vals[1] < 0.5 * vals[2], vals


def test_swd_separates_distributions():
    x, y = CB.reference(4096, seed=1)[0], CB.reference(4096, seed=2)[0]
    same = sliced_wasserstein(x, y)
    for other in ("gaussians8", "moons", "spirals"):
        assert sliced_wasserstein(x, get_data(f"toy:{other}").reference(4096)[0]) > 5 * same, other


def test_swd_of_a_translation():
    # a shift by e moves every projection by <u, e>, so SW1 = E_u |<u, e>| = 2|e|/pi in 2-D
    x = CB.reference(1024, seed=1)[0]
    assert sliced_wasserstein(x, x + torch.tensor([1.0, 0.0])) == pytest.approx(2 / np.pi, rel=0.03)
    assert sliced_wasserstein(x, x + torch.tensor([0.0, 3.0])) == pytest.approx(6 / np.pi, rel=0.03)


@pytest.mark.parametrize("n,m", [(7, 13), (100, 37), (5, 5), (1, 4)])
def test_exact_w1_with_unequal_sizes_matches_scipy(n, m):
    rng = np.random.default_rng(n * 100 + m)
    a, b = rng.normal(size=n), rng.normal(size=m) * 2 + 0.3
    ours = _w1_sorted(torch.tensor(np.sort(a))[None], torch.tensor(np.sort(b))[None]).item()
    assert ours == pytest.approx(scipy.stats.wasserstein_distance(a, b), rel=1e-12)


def test_swd_unequal_sizes_deterministic_and_array_input():
    x, y = CB.reference(4096, seed=1)[0], CB.reference(4096, seed=2)[0]
    a = sliced_wasserstein(x[:1000], y)
    assert a == sliced_wasserstein(x[:1000].numpy(), y.numpy())  # numpy in, same value
    assert a == pytest.approx(sliced_wasserstein(x[:1000], y[:1000]), abs=0.03)
    assert sliced_wasserstein(x, y, seed=1) != sliced_wasserstein(x, y, seed=2)  # the seed picks directions


def test_mmd_energy_symmetric_and_nonnegative():
    x, y = CB.reference(1000, seed=1)[0], get_data("toy:moons").reference(1000)[0]
    assert energy_distance(x, y) == pytest.approx(energy_distance(y, x), rel=1e-9)
    assert mmd_rbf(x, y) == pytest.approx(mmd_rbf(y, x), rel=1e-9)
    assert energy_distance(x, y) > 0.05 and mmd_rbf(x, y) > 0.01
    x2 = CB.reference(1000, seed=2)[0]
    assert energy_distance(x, x2) >= 0 and mmd_rbf(x, x2) > -1e-3
    assert energy_distance(x, x2) < 0.1 * energy_distance(x, y)
    assert mmd_rbf(x, x2) < 0.1 * mmd_rbf(x, y)


def test_mmd_bandwidth_and_subsampling():
    x, y = CB.reference(500, seed=1)[0], CB.reference(500, seed=2)[0] + 0.5
    h = median_bandwidth(x, y)
    assert mmd_rbf(x, y) == pytest.approx(mmd_rbf(x, y, bandwidth=h), rel=1e-12)
    assert median_bandwidth(torch.zeros(10, 2), torch.zeros(10, 2)) == 1.0  # degenerate: no NaN
    # capped sets are subsampled deterministically
    assert mmd_rbf(x, y, max_points=200) == mmd_rbf(x, y, max_points=200)
    assert energy_distance(x, y, max_points=200) == pytest.approx(energy_distance(x, y), rel=0.5)
    # identical sets above the cap are subsampled identically: still exactly 0
    assert energy_distance(x, x.clone(), max_points=200) == 0.0


def test_errors_are_one_line_fewstep_errors():
    with pytest.raises(FewstepError, match="different dimension"):
        sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(FewstepError, match="at least 2"):
        mmd_rbf(torch.zeros(1, 2), torch.zeros(5, 2))


def test_gaussians8_coverage():
    x = get_data("toy:gaussians8").reference(8000)[0]
    cov = gaussians8_coverage(x)
    assert cov["modes_covered"] == 8 and cov["num_modes"] == 8
    assert all(abs(f - 1 / 8) < 0.02 for f in cov["per_mode"])
    assert cov["off_mode"] < 0.03  # P(|z| > 3 sigma) for a 2-D Gaussian is exp(-4.5) = 1.1%
    assert cov["min_fraction"] == min(cov["per_mode"]) and cov["max_fraction"] == max(cov["per_mode"])
    g = torch.Generator().manual_seed(0)
    one = gaussians8_centers()[3] + 0.05 * torch.randn(500, 2, generator=g)
    c1 = gaussians8_coverage(one)
    assert c1["modes_covered"] == 1 and c1["per_mode"][3] == pytest.approx(1.0) and c1["min_fraction"] == 0
    far = mode_coverage(torch.full((10, 2), 50.0), gaussians8_centers(), 0.1)
    assert far["off_mode"] == 1.0 and far["modes_covered"] == 0


def test_coverage_threshold_is_one_percent():
    c = gaussians8_centers()
    x = torch.cat([c[0].expand(990, 2), c[1].expand(10, 2)])  # mode 1 holds exactly 1%
    assert gaussians8_coverage(x)["modes_covered"] == 2
    x = torch.cat([c[0].expand(991, 2), c[1].expand(9, 2)])  # 0.9%: not covered
    assert gaussians8_coverage(x)["modes_covered"] == 1
    assert gaussians8_coverage(x, min_fraction=0.005)["modes_covered"] == 2
