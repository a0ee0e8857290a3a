"""GAN heads that read a denoiser's intermediate features (DMD2, Yin et al. 2024b).

DMD2's discriminator is a small classifier on the fake score's bottleneck features: the fake score
sees a noised image (real or generated) at time t and its encoder features feed a few layers that
output one logit. `feature_layer(net)` names the layer to read (the built-in networks say so with a
`feature_layer()` method; diffusers UNets use their `mid_block`, transformers their middle block), and
`capture_features` runs a forward pass and returns that layer's output.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fewstep.errors import FewstepError


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP/FSDP-style wrappers (they keep it as `.module`)."""
    while isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    return module


def feature_layer(network: nn.Module) -> nn.Module:
    """The layer of a network whose output the GAN head reads (its bottleneck)."""
    network = unwrap(network)
    if hasattr(network, "feature_layer"):
        return network.feature_layer()
    for name in ("mid_block", "middle_block"):  # diffusers UNets
        layer = getattr(network, name, None)
        if isinstance(layer, nn.Module):
            return layer
    blocks = getattr(network, "transformer_blocks", None)  # diffusers DiTs: the middle block
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        return blocks[len(blocks) // 2]
    raise FewstepError(f"cannot find the feature layer of a {type(network).__name__} for the GAN head: give the "
                       "network a feature_layer() method that returns the module to read")


@contextlib.contextmanager
def capture_features(layer: nn.Module):
    """Within the block, every forward pass through the model stores `layer`'s output in the yielded dict
    under "features" (the first tensor when the layer returns a tuple)."""
    store: dict = {}

    def hook(module, inputs, output):
        store["features"] = output[0] if isinstance(output, (tuple, list)) else output

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _groups(ch: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if ch % g == 0 and ch // g >= 2:
            return g
    return 1


class DiscriminatorHead(nn.Module):
    """One logit per sample from features of shape (C, H, W) (conv blocks, then average pooling), (L, C)
    (tokens: mean over L) or (C,) (an MLP)."""

    def __init__(self, feature_shape: tuple[int, ...], width: int | None = None):
        super().__init__()
        self.feature_shape = tuple(int(d) for d in feature_shape)
        if len(self.feature_shape) == 3:
            c, h, w = self.feature_shape
            width = width or c
            layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(_groups(width), width),
                                       nn.SiLU()]
            if min(h, w) >= 4:  # DMD2's head downsamples with a stride-2 4x4 convolution
                layers += [nn.Conv2d(width, width, 4, stride=2, padding=1), nn.GroupNorm(_groups(width), width),
                           nn.SiLU()]
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1)]
        elif len(self.feature_shape) in (1, 2):
            c = self.feature_shape[-1]
            width = width or c
            layers = [nn.LayerNorm(c), nn.Linear(c, width), nn.SiLU(), nn.Linear(width, 1)]
        else:
            raise FewstepError(f"no GAN head for features of shape {self.feature_shape}")
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1:] != self.feature_shape:
            raise FewstepError(f"GAN head built for features {self.feature_shape}, got {tuple(features.shape[1:])}")
        if features.ndim == 3:  # tokens
            features = features.mean(1)
        return self.layers(features).squeeze(-1)
