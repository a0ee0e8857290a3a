"""A residual MLP with time (and optional class) embedding for low-dimensional data."""

from __future__ import annotations

import torch
from torch import nn

from fewstep.models.embeddings import TimeClassEmbedding


class ResidualMLPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h, emb):
        z = self.fc1(torch.nn.functional.silu(self.norm(h))) + self.emb(emb)
        return h + self.fc2(torch.nn.functional.silu(z))


class MLPNet(nn.Module):
    """net(x, t, labels) for x of shape (B, dim): residual MLP blocks conditioned on emb(t, label)."""

    def __init__(self, dim: int = 2, width: int = 256, depth: int = 4, time_scale: float = 1000.0,
                 num_classes: int | None = None, guidance_embed: bool = False, steps_embed: bool = False):
        super().__init__()
        self._config = {"type": "mlp", "dim": dim, "width": width, "depth": depth, "time_scale": time_scale,
                        "num_classes": num_classes}
        if guidance_embed:
            self._config["guidance_embed"] = True
        if steps_embed:
            self._config["steps_embed"] = True
        self.embed = TimeClassEmbedding(width, time_scale, num_classes, guidance_embed=guidance_embed,
                                        steps_embed=steps_embed)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualMLPBlock(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def forward(self, x, t, cond=None, guidance=None, steps=None):
        emb = torch.nn.functional.silu(self.embed(t, cond, x.dtype, guidance, steps))
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, emb)
        return self.out(torch.nn.functional.silu(self.out_norm(h)))

    def bottleneck(self) -> nn.Module:
        """The layer whose output GAN heads read (DMD2): the last residual block."""
        return self.blocks[-1]

    def config(self) -> dict:
        return dict(self._config)
