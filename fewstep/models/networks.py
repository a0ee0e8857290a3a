"""Rebuild a built-in network from its config() dict."""

from __future__ import annotations

from torch import nn

from fewstep.errors import FewstepError
from fewstep.models.mlp import MLPNet
from fewstep.models.unet import UNetNet

NETWORKS = {"mlp": MLPNet, "unet": UNetNet}


def build_network(config: dict) -> nn.Module:
    cfg = dict(config)
    kind = cfg.pop("type", None)
    if kind not in NETWORKS:
        raise FewstepError(f"unknown network type {kind!r}; allowed: {', '.join(NETWORKS)}")
    try:
        return NETWORKS[kind](**cfg)
    except TypeError as e:
        raise FewstepError(f"bad {kind} network config: {e}") from None
