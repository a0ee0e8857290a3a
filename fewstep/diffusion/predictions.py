"""Prediction types and exact conversions between them, for any noise process.

Every prediction type is linear in (x0, eps) at a given state: pred = a(t) x0 + b(t) eps, while
x_t = alpha(t) x0 + sigma(t) eps. Solving that 2x2 system converts any prediction into x0 and
eps, and from there into any other type:

- ``eps``: the noise (DDPM, Ho et al. 2020)                       a = 0,           b = 1
- ``x0``: the clean sample                                       a = 1,           b = 0
- ``v``: v = alpha eps - sigma x0 (Salimans & Ho 2022)           a = -sigma,      b = alpha
- ``flow``: velocity dx_t/dt of the process' own path            a = alpha'(t),   b = sigma'(t)
  (for rectified flow: eps - x0, Lipman et al. 2023 / Liu et al. 2023)
- ``trigflow``: TrigFlow's F (Lu & Song 2024) at the TrigFlow time tau with the same SNR,
  tan(tau) = (sigma/alpha) / sigma_d:  F = cos(tau) eps - sin(tau) x0 / sigma_d.
"""

from __future__ import annotations

import torch

from fewstep.diffusion.processes import NoiseProcess, as_time, expand_like
from fewstep.errors import FewstepError

PREDICTION_TYPES = ("eps", "x0", "v", "flow", "trigflow")


def check_prediction(kind: str) -> str:
    if kind not in PREDICTION_TYPES:
        raise FewstepError(f"unknown prediction type {kind!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    return kind


def prediction_coeffs(kind: str, process: NoiseProcess, t, sigma_d: float = 1.0):
    """(a, b) with pred = a x0 + b eps for prediction `kind` of `process` at time t."""
    t = as_time(t)
    if kind == "eps":
        return torch.zeros_like(t), torch.ones_like(t)
    if kind == "x0":
        return torch.ones_like(t), torch.zeros_like(t)
    if kind == "v":
        return -process.sigma(t), process.alpha(t)
    if kind == "flow":
        return process.d_alpha(t), process.d_sigma(t)
    if kind == "trigflow":
        tau = torch.atan(process.ratio(t) / sigma_d)
        return -torch.sin(tau) / sigma_d, torch.cos(tau)
    check_prediction(kind)
    raise AssertionError  # pragma: no cover


def to_x0_eps(pred, x_t, t, process: NoiseProcess, kind: str, sigma_d: float = 1.0):
    """Recover (x0, eps) from a prediction of type `kind` at state x_t (exact, linear)."""
    t = as_time(t, x_t)
    a, b = prediction_coeffs(kind, process, t, sigma_d)
    alpha, sigma = process.alpha(t), process.sigma(t)
    det = b * alpha - a * sigma
    x0 = (expand_like(b / det, x_t) * x_t - expand_like(sigma / det, x_t) * pred)
    eps = (expand_like(alpha / det, x_t) * pred - expand_like(a / det, x_t) * x_t)
    return x0, eps


def to_x0(pred, x_t, t, process: NoiseProcess, kind: str, sigma_d: float = 1.0):
    """x0 implied by a prediction of type `kind` (see module docstring)."""
    if kind == "x0":
        return pred
    return to_x0_eps(pred, x_t, t, process, kind, sigma_d)[0]


def from_x0(x0, x_t, t, process: NoiseProcess, kind: str, sigma_d: float = 1.0):
    """The prediction of type `kind` that corresponds to the clean estimate x0 at state x_t."""
    if kind == "x0":
        return x0
    t = as_time(t, x_t)
    a, b = prediction_coeffs(kind, process, t, sigma_d)
    alpha, sigma = process.alpha(t), process.sigma(t)
    eps = (x_t - expand_like(alpha, x_t) * x0) / expand_like(sigma, x_t)
    return expand_like(a, x_t) * x0 + expand_like(b, x_t) * eps


def convert_prediction(pred, x_t, t, process: NoiseProcess, src: str, dst: str, sigma_d: float = 1.0):
    """Convert a prediction from type `src` to type `dst` at the same state (same process)."""
    check_prediction(src)
    check_prediction(dst)
    if src == dst:
        return pred
    t = as_time(t, x_t)
    x0, eps = to_x0_eps(pred, x_t, t, process, src, sigma_d)
    a, b = prediction_coeffs(dst, process, t, sigma_d)
    return expand_like(a, x_t) * x0 + expand_like(b, x_t) * eps
