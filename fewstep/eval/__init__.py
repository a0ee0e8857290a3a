"""Evaluation for built-in data: toy distances, mode coverage, FD-digits, and the shared Frechet distance.

Names are imported lazily (PEP 562), so `import fewstep.eval` is cheap and
`python -m fewstep.eval.digits --train ...` runs without importing its own module twice.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "class_coverage": "digits", "digits_features": "digits", "fd_digits": "digits", "label_accuracy": "digits",
    "feature_stats": "frechet", "frechet_distance": "frechet", "frechet_distance_features": "frechet",
    "METRICS": "registry", "check_metric": "registry", "default_metric": "registry", "evaluate": "registry",
    "lower_is_better": "registry",
    "energy_distance": "toy", "gaussians8_coverage": "toy", "mmd_rbf": "toy", "mode_coverage": "toy",
    "sliced_wasserstein": "toy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fewstep.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fewstep.eval.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
