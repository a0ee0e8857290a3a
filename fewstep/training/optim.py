"""Optimizers and the learning-rate schedule of a run."""

from __future__ import annotations

import math

import torch

from fewstep.errors import FewstepError


def make_optimizer(kind: str, params, *, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0):
    """AdamW (Loshchilov & Hutter 2019), or bitsandbytes' AdamW8bit (block-wise 8-bit moments, Dettmers et al.
    2022) when `kind` is "adamw8bit" and bitsandbytes is installed."""
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise FewstepError("--optimizer adamw8bit needs bitsandbytes, which is not installed (pip install "
                               "bitsandbytes), or use --optimizer adamw") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if kind != "adamw":
        raise FewstepError(f"unknown --optimizer {kind!r}; allowed: adamw, adamw8bit")
    params = list(params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, **adamw_kernel(params))


def adamw_kernel(params) -> dict:
    """How AdamW updates `params`: one fused CUDA kernel (``fused=True``) when they are all floating-point tensors on
    CUDA, else torch's multi-tensor (foreach) path, which is what the CPU runs (and what keeps CPU runs bit for bit
    as before)."""
    params = [p for p in params if isinstance(p, torch.Tensor)]
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True, "foreach": None}
    return {"foreach": True, "fused": None}


def lr_factor(it: int, *, warmup: int, schedule: str, iters: int) -> float:
    """The multiplier of the base learning rates at iteration `it` (0-based): a linear warm-up over `warmup`
    iterations, then constant or a cosine decay to 0 at `iters`."""
    if warmup and it < warmup:
        return (it + 1) / warmup
    if schedule == "cosine":
        p = (it - warmup) / max(1, iters - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return 1.0
