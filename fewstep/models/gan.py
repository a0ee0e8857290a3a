"""GAN heads that read a denoiser's intermediate features (DMD2, Yin et al. 2024b).

DMD2's discriminator is a small classifier on the fake score's bottleneck features: the fake score
sees a noised image (real or generated) at time t and its encoder features feed a few layers that
output one logit. `feature_layer(model)` names the layer to read (networks say so with a `bottleneck()`
method: the built-in ones and the diffusers adapters), and `capture_features` records that layer's output
during a forward pass.
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


def feature_layer(model: nn.Module) -> nn.Module:
    """The layer whose output the GAN head reads (the bottleneck) of a network, or of a Denoiser's network
    (DDP-style wrappers are looked through): its `bottleneck()` (built-in networks, diffusers adapters), else a
    diffusers UNet's `mid_block` or a DiT's middle transformer block."""
    model = unwrap(model)
    network = getattr(model, "net", model)
    if hasattr(network, "bottleneck"):
        return network.bottleneck()
    for name in ("mid_block", "middle_block"):  # diffusers UNets
        layer = getattr(network, name, None)
        if isinstance(layer, nn.Module):
            return layer
    blocks = getattr(network, "transformer_blocks", None)  # diffusers DiTs: the middle block
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        return blocks[len(blocks) // 2]
    raise FewstepError(f"cannot find the bottleneck of a {type(network).__name__} for the GAN head: give the "
                       "network a bottleneck() method that returns the module to read")


@contextlib.contextmanager
def capture_features(layer: nn.Module):
    """Within the block, every forward pass through `layer` stores its output in the yielded dict under
    "features" (a layer that returns a tuple, like an SD3 joint block (text, image), gives its last entry).
    Gradients flow through the stored tensor."""
    store: dict = {}

    def hook(module, inputs, output):
        store["features"] = output[-1] if isinstance(output, (tuple, list)) else output

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
