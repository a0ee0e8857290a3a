"""Evaluation for built-in data: toy distances, mode coverage, FD-digits, and the shared Frechet distance."""

from fewstep.eval.digits import class_coverage, digits_features, fd_digits, label_accuracy
from fewstep.eval.frechet import feature_stats, frechet_distance, frechet_distance_features
from fewstep.eval.registry import METRICS, check_metric, default_metric, evaluate, lower_is_better
from fewstep.eval.toy import energy_distance, gaussians8_coverage, mmd_rbf, mode_coverage, sliced_wasserstein

__all__ = [
    "METRICS", "check_metric", "class_coverage", "default_metric", "digits_features", "energy_distance",
    "evaluate", "fd_digits", "feature_stats", "frechet_distance", "frechet_distance_features",
    "gaussians8_coverage", "label_accuracy", "lower_is_better", "mmd_rbf", "mode_coverage", "sliced_wasserstein",
]
