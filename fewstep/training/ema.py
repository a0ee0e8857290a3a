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


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters; buffers are copied."""
    ema_params = list(ema.parameters())
    params = [p.detach().to(pe.dtype) for pe, p in zip(ema_params, model.parameters(), strict=True)]
    if ema_params:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(b)
