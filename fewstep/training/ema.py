"""Exponential moving averages of network weights: fixed decay, or the power EMA of Karras et al. 2024."""

from __future__ import annotations

import torch
from torch import nn


def ema_decay_at(kind: str, step: int, decay: float = 0.999, gamma: float = 6.94) -> float:
    """The decay used after optimizer step `step` (1-based).

    fixed: min(decay, (1 + step) / (10 + step)) (the usual warm-up so early weights fade fast);
    power: beta_t = (1 - 1/t)^(gamma + 1) (EDM2's power function EMA, profile t^gamma).
    """
    if kind == "power":
        return (1.0 - 1.0 / max(step, 1)) ** (gamma + 1.0)
    if kind == "fixed":
        return min(decay, (1.0 + step) / (10.0 + step))
    raise ValueError(f"unknown EMA kind {kind!r}")


def ema_pairs(ema: nn.Module, model: nn.Module) -> tuple[list, list, list, list]:
    """(EMA parameters, model parameters, EMA buffers, model buffers) of two modules of the same structure, the
    lists `ema_update` walks (a trainer builds them once and passes them to every update)."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    ema_buffers, buffers = list(ema.buffers()), list(model.buffers())
    if len(ema_params) != len(params) or len(ema_buffers) != len(buffers):
        raise ValueError("the EMA and its model have different parameters or buffers")
    return ema_params, params, ema_buffers, buffers


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, pairs: tuple | None = None) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters; buffers are copied. `pairs`: `ema_pairs(ema, model)`
    when already at hand."""
    ema_params, model_params, ema_buffers, buffers = pairs if pairs is not None else ema_pairs(ema, model)
    if ema_params:
        params = [p if p.dtype == pe.dtype else p.to(pe.dtype) for pe, p in zip(ema_params, model_params, strict=True)]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for be, b in zip(ema_buffers, buffers, strict=True):
        be.copy_(b)
