"""Evaluation: toy distances, mode coverage, FD-digits, Inception FID/KID/precision-recall, CLIP score,
and the shared Frechet distance.

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
    "FeatureAccumulator": "fid", "compute_fid": "fid", "load_reference_stats": "fid", "reference_stats": "fid",
    "ImageFolderSamples": "sources", "ModelSamples": "sources", "NpzSamples": "sources", "open_samples": "sources",
    "FIDInceptionV3": "inception", "InceptionFeatures": "inception", "inception_features": "inception",
    "kid": "prdc", "precision_recall": "prdc",
    "CLIPScorer": "clip_score", "compute_clip_score": "clip_score",
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
