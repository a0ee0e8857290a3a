"""`evaluate()` dispatch: names, references from built-in data, JSON-able results, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

import fewstep.eval as fe
from fewstep.data import get_data
from fewstep.data.digits import load_digits_tensors
from fewstep.errors import FewstepError
from fewstep.eval import METRICS, default_metric, evaluate, lower_is_better


def gaussians8(n, seed=7):
    return get_data("toy:gaussians8").reference(n, seed=seed)[0]


def test_metric_names_defaults_and_direction():
    assert set(METRICS) == {"swd", "mmd", "energy", "coverage", "fd-digits", "class-coverage"}
    assert default_metric("toy:moons") == "swd" and default_metric("checkerboard") == "swd"
    assert default_metric("digits") == "fd-digits" and default_metric("digits16") == "fd-digits"
    assert all(lower_is_better(m) for m in ("swd", "mmd", "energy", "fd-digits"))
    assert not lower_is_better("coverage") and not lower_is_better("class-coverage")
    with pytest.raises(FewstepError, match="unknown metric 'fid'; allowed: swd, mmd"):
        lower_is_better("fid")
    assert set(fe.__all__) >= {"evaluate", "sliced_wasserstein", "frechet_distance", "fd_digits"}


@pytest.mark.parametrize("metric", ["swd", "mmd", "energy"])
def test_point_metrics_with_builtin_and_given_reference(metric):
    x = gaussians8(1000)
    good = evaluate(metric, x, data="toy:gaussians8")
    bad = evaluate(metric, x, data="toy:checkerboard")
    json.dumps(good)
    assert good["metric"] == metric and good["ref"] == "toy:gaussians8"
    assert good["n_samples"] == 1000 and good["n_ref"] == 4096 and good["lower_is_better"] is True
    assert good["value"] < 0.2 * bad["value"]
    given = evaluate(metric, x, gaussians8(500, seed=9))
    assert given["ref"] == "<given>" and given["n_ref"] == 500 and given["value"] < 0.4 * bad["value"]
    assert evaluate(metric, x.numpy(), data="toy:gaussians8")["value"] == pytest.approx(good["value"])


def test_swd_reference_grows_with_many_samples():
    r = evaluate("swd", gaussians8(5000), data="gaussians8")
    assert r["n_ref"] == 5000 and r["ref"] == "toy:gaussians8"


def test_coverage_metrics():
    r = evaluate("coverage", gaussians8(2000))
    json.dumps(r)
    assert r["modes_covered"] == 8 and r["value"] == r["min_fraction"] > 0.1 and r["ref"] is None
    assert evaluate("coverage", torch.full((50, 2), 2.0) * torch.tensor([1.0, 0.0]))["modes_covered"] == 1
    x, y = load_digits_tensors("test", 8)
    r = evaluate("class-coverage", x, labels=y)
    json.dumps(r)
    assert r["classes_covered"] == 10 and r["label_accuracy"] >= 0.97 and r["lower_is_better"] is False


def test_fd_digits_dispatch():
    xt, yt = load_digits_tensors("test", 8)
    r = evaluate("fd-digits", xt, data="digits", labels=yt)
    json.dumps(r)
    assert r["ref"] == "digits" and r["n_ref"] == 1797 and 0 < r["value"] < 50
    assert r["label_accuracy"] >= 0.97 and r["feature_dim"] == 64 and len(r["classifier_sha256"]) == 64
    # 16x16 samples against the digits16 data: reference at the samples' resolution
    x16, _ = load_digits_tensors("test", 16)
    assert evaluate("fd-digits", x16, data="digits16")["value"] < 50
    # an explicit reference tensor
    xa, _ = load_digits_tensors("all", 8)
    given = evaluate("fd-digits", xt, xa)
    assert given["ref"] == "<given>" and given["n_ref"] == 1797 and given["value"] == pytest.approx(r["value"])
    noise = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert evaluate("fd-digits", noise, data="digits")["value"] > 10 * r["value"]


def test_errors_are_fewstep_errors_with_one_line():
    pts = gaussians8(100)
    xt, _ = load_digits_tensors("test", 8)
    cases = [
        (lambda: evaluate("fid", pts), "unknown metric 'fid'; allowed: swd, mmd, energy, coverage, fd-digits"),
        (lambda: evaluate("swd", xt, data="digits"), "swd is a metric for point sets"),
        (lambda: evaluate("fd-digits", pts, data="digits"), "fd-digits is a metric for digit images"),
        (lambda: evaluate("class-coverage", pts), "class-coverage is a metric for digit images"),
        (lambda: evaluate("mmd", pts), "needs a reference"),
        (lambda: evaluate("swd", pts, torch.randn(10, 3)), "different shapes"),
        (lambda: evaluate("fd-digits", xt, pts), "reference images"),
        (lambda: evaluate("coverage", torch.randn(10, 3)), "2-D 8-Gaussians"),
        (lambda: evaluate("swd", pts[:1], data="toy:moons"), "at least 2"),
        (lambda: evaluate("swd", torch.full((5, 2), float("nan")), data="toy:moons"), "non-finite"),
        (lambda: evaluate("swd", pts, data="toy:nope"), "unknown data"),
    ]
    for call, message in cases:
        with pytest.raises(FewstepError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FewstepError, match="no default metric"):
        default_metric("/some/folder")
