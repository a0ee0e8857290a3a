"""`evaluate(metric, samples, ref)`: one entry point for every built-in metric, JSON-able results."""

from __future__ import annotations

import torch

from fewstep.errors import FewstepError
from fewstep.eval import digits as digits_metrics
from fewstep.eval import toy

METRICS = ("swd", "mmd", "energy", "coverage", "fd-digits", "class-coverage")
_LOWER_IS_BETTER = {"swd": True, "mmd": True, "energy": True, "coverage": False, "fd-digits": True,
                    "class-coverage": False}
_REFERENCE_FREE = ("coverage", "class-coverage")
_DESCRIPTIONS = {
    "swd": "sliced Wasserstein distance (256 projections) to the reference",
    "mmd": "unbiased MMD^2, RBF kernel with median-heuristic bandwidth",
    "energy": "energy distance",
    "coverage": "8-Gaussians mode coverage (value: smallest mode's fraction; 1/8 is ideal)",
    "fd-digits": "Frechet distance in the shipped digits classifier's 64-d features",
    "class-coverage": "predicted-class histogram of digits (value: smallest class fraction; 0.1 is ideal)",
}


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise FewstepError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    return metric


def default_metric(data_name: str) -> str:
    """swd for 2-D toys, fd-digits for digits."""
    from fewstep.data import canonical_data_name

    name = canonical_data_name(str(data_name))
    if name.startswith("toy:"):
        return "swd"
    if name in ("digits", "digits16"):
        return "fd-digits"
    raise FewstepError(f"no default metric for data {data_name!r}; name one of {', '.join(METRICS)}")


def lower_is_better(metric: str) -> bool:
    return _LOWER_IS_BETTER[check_metric(metric)]


def _reference(data: str | None, n: int | None):
    from fewstep.data import get_data

    if data is None:
        raise FewstepError("this metric needs a reference: pass ref samples or a built-in data name")
    src = get_data(data)
    return src.reference(n)[0], src.name


def evaluate(metric: str, samples, ref=None, *, data: str | None = None, labels=None) -> dict:
    """Score `samples` with `metric` against `ref` (tensor) or the held-out set of built-in `data`."""
    check_metric(metric)
    x = torch.as_tensor(samples).detach().float().cpu()
    result = {"metric": metric, "description": _DESCRIPTIONS[metric], "lower_is_better": _LOWER_IS_BETTER[metric],
              "n_samples": int(x.shape[0])}
    is_points = x.ndim == 2
    if metric in ("swd", "mmd", "energy", "coverage") and not is_points:
        raise FewstepError(f"{metric} is a metric for 2-D point sets; these samples have shape "
                           f"{tuple(x.shape[1:])} (use fd-digits or class-coverage for images)")
    if metric in ("fd-digits", "class-coverage") and is_points:
        raise FewstepError(f"{metric} is a metric for digit images; these samples are points of dimension "
                           f"{x.shape[1]} (use swd, mmd or energy)")
    if metric in _REFERENCE_FREE:
        if metric == "coverage":
            extra = toy.gaussians8_coverage(x)
        else:
            extra = digits_metrics.class_coverage(x)
            if labels is not None:
                extra["label_accuracy"] = round(digits_metrics.label_accuracy(x, labels), 5)
        result.update(value=extra["min_fraction"], **extra)
        return result
    ref_name = "<given>"
    if ref is None:
        n_ref = None if metric == "fd-digits" else max(4096, x.shape[0]) if x.shape[0] > 4096 else 4096
        ref, ref_name = _reference(data, n_ref)
    ref = torch.as_tensor(ref).detach().float().cpu()
    if ref.shape[1:] != x.shape[1:] and not (metric == "fd-digits" and ref.ndim == 4):
        raise FewstepError(f"samples {tuple(x.shape[1:])} and reference {tuple(ref.shape[1:])} have different shapes")
    if metric == "swd":
        value = toy.sliced_wasserstein(x, ref)
    elif metric == "mmd":
        value = toy.mmd_rbf(x, ref)
    elif metric == "energy":
        value = toy.energy_distance(x, ref)
    else:
        value = digits_metrics.fd_digits(x, None if ref_name != "<given>" else ref)
        if labels is not None:
            result["label_accuracy"] = round(digits_metrics.label_accuracy(x, labels), 5)
    result.update(value=float(value), n_ref=int(ref.shape[0]), ref=ref_name)
    return result
