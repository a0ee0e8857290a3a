"""`evaluate(metric, samples, ref)`: one entry point for every built-in metric, JSON-able results."""

from __future__ import annotations

import torch

from fewstep.data import canonical_data_name
from fewstep.errors import FewstepError
from fewstep.eval import digits as digits_metrics
from fewstep.eval import toy

METRICS = ("swd", "mmd", "energy", "coverage", "fd-digits", "class-coverage")
_LOWER_IS_BETTER = {"swd": True, "mmd": True, "energy": True, "coverage": False, "fd-digits": True,
                    "class-coverage": False}
_REFERENCE_FREE = ("coverage", "class-coverage")
_POINT_METRICS = ("swd", "mmd", "energy", "coverage")
_IMAGE_METRICS = ("fd-digits", "class-coverage")
_DIGITS_DATA = ("digits", "digits16")
DEFAULT_TOY_REFERENCE = 4096  # held-out toy points (or as many as the samples, if more)
_DESCRIPTIONS = {
    "swd": "sliced Wasserstein distance (256 projections) to the reference",
    "mmd": "unbiased MMD^2, RBF kernel with median-heuristic bandwidth",
    "energy": "energy distance",
    "coverage": "8-Gaussians mode coverage (value: smallest mode's fraction; 1/8 is ideal)",
    "fd-digits": "Frechet distance in the shipped digits classifier's 64-d features",
    "class-coverage": "predicted-class histogram of digits (value: smallest class fraction; 0.1 is ideal)",
}


def check_metric(metric: str) -> str:
    """`metric` itself if it is known, else a FewstepError listing the allowed names."""
    if metric not in METRICS:
        raise FewstepError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    return metric


def default_metric(data_name: str) -> str:
    """swd for 2-D toys, fd-digits for digits."""
    name = canonical_data_name(str(data_name))
    if name.startswith("toy:"):
        return "swd"
    if name in ("digits", "digits16"):
        return "fd-digits"
    raise FewstepError(f"no default metric for data {data_name!r}; name one of {', '.join(METRICS)}")


def lower_is_better(metric: str) -> bool:
    """True for distances (swd, mmd, energy, fd-digits); False for the coverage fractions."""
    return _LOWER_IS_BETTER[check_metric(metric)]


def _reference(data: str | None, n: int | None):
    from fewstep.data import get_data

    if data is None:
        raise FewstepError("this metric needs a reference: pass ref samples or a built-in data name")
    src = get_data(data)
    return src.reference(n)[0], src.name


def _as_samples(samples, what: str) -> torch.Tensor:
    x = torch.as_tensor(samples).detach().cpu()
    if x.ndim < 2:
        raise FewstepError(f"{what} must be a batch (N, ...) of points or images; got shape {tuple(x.shape)}")
    x = x.float()
    if x.shape[0] < 2:
        raise FewstepError(f"need at least 2 {what}, got {x.shape[0]}")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise FewstepError(f"{what} contain {bad} non-finite values (NaN or inf): the generator diverged")
    return x


def evaluate(metric: str, samples, ref=None, *, data: str | None = None, labels=None) -> dict:
    """Score `samples` with `metric` against `ref` (tensor) or the held-out set of built-in `data`.

    Returns a JSON-able dict: metric, value, lower_is_better, n_samples, n_ref and ref (None for
    the reference-free coverage metrics), plus the metric's extras.
    """
    check_metric(metric)
    x = _as_samples(samples, "samples")
    result = {"metric": metric, "description": _DESCRIPTIONS[metric], "lower_is_better": _LOWER_IS_BETTER[metric],
              "n_samples": int(x.shape[0])}
    if metric in _POINT_METRICS and x.ndim != 2:
        raise FewstepError(f"{metric} is a metric for point sets (N, D); these samples have shape "
                           f"{tuple(x.shape[1:])} (use fd-digits or class-coverage for images)")
    if metric in _IMAGE_METRICS and x.ndim != 4:
        raise FewstepError(f"{metric} is a metric for digit images (N, C, H, W); these samples have shape "
                           f"{tuple(x.shape[1:])} (use swd, mmd or energy for points)")
    if metric == "coverage" and x.shape[1] != 2:
        raise FewstepError(f"coverage counts the modes of the 2-D 8-Gaussians toy; these points have dimension "
                           f"{x.shape[1]}")
    if labels is not None and metric in _IMAGE_METRICS:
        result["label_accuracy"] = round(digits_metrics.label_accuracy(x, labels), 5)
    if metric in _REFERENCE_FREE:
        extra = toy.gaussians8_coverage(x) if metric == "coverage" else digits_metrics.class_coverage(x)
        result.update(value=float(extra["min_fraction"]), n_ref=None, ref=None, **extra)
        return result

    if metric == "fd-digits":
        result.update(feature_dim=digits_metrics.FEATURE_DIM, classifier_sha256=digits_metrics.classifier_sha256(),
                      resolution=int(x.shape[-1]))
        if ref is None and data is not None and canonical_data_name(data) in _DIGITS_DATA:
            # all 1797 digits at the samples' resolution; statistics cached in memory
            value = digits_metrics.fd_digits(x)
            result.update(value=float(value), n_ref=digits_metrics.NUM_REFERENCE, ref=canonical_data_name(data))
            return result

    ref_name = "<given>"
    if ref is None:
        n_ref = None if metric == "fd-digits" else max(DEFAULT_TOY_REFERENCE, x.shape[0])
        ref, ref_name = _reference(data, n_ref)
    ref = _as_samples(ref, "reference samples")
    if metric == "fd-digits":
        if ref.ndim != 4:
            raise FewstepError(f"fd-digits needs reference images (N, C, H, W); got shape {tuple(ref.shape)}")
    elif ref.shape[1:] != x.shape[1:]:
        raise FewstepError(f"samples {tuple(x.shape[1:])} and reference {tuple(ref.shape[1:])} have different shapes")
    if metric == "swd":
        value = toy.sliced_wasserstein(x, ref)
    elif metric == "mmd":
        value = toy.mmd_rbf(x, ref)
    elif metric == "energy":
        value = toy.energy_distance(x, ref)
    else:
        value = digits_metrics.fd_digits(x, ref)
    result.update(value=float(value), n_ref=int(ref.shape[0]), ref=ref_name)
    return result
