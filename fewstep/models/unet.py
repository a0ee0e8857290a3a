"""A small UNet for images (DDPM layout, Ho et al. 2020), with self-attention at the lowest resolution.

Residual blocks (GroupNorm, SiLU, 3x3 convs) receive the time/class embedding; attention goes through
`fewstep_kernels.attention`, so forward-mode AD (torch.func.jvp, for sCM-style training) works on every
device and uses the fused flash-attention JVP kernel on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fewstep_kernels import attention
from torch import nn

from fewstep.models.embeddings import TimeClassEmbedding


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, ch: int, heads: int = 1):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        o = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(o.transpose(-1, -2).reshape(b, c, h, w))


class UNetNet(nn.Module):
    """net(x, t, labels) for images (B, C, H, W); H and W divisible by 2^(len(mults) - 1)."""

    def __init__(self, in_channels: int = 1, base: int = 32, mults=(1, 2), num_res: int = 1, heads: int = 1,
                 time_scale: float = 1000.0, num_classes: int | None = None, dropout: float = 0.0,
                 guidance_embed: bool = False, steps_embed: bool = False):
        super().__init__()
        mults = tuple(int(m) for m in mults)
        self._config = {"type": "unet", "in_channels": in_channels, "base": base, "mults": list(mults),
                        "num_res": num_res, "heads": heads, "time_scale": time_scale, "num_classes": num_classes,
                        "dropout": dropout}
        if guidance_embed:
            self._config["guidance_embed"] = True
        if steps_embed:
            self._config["steps_embed"] = True
        emb_dim = 4 * base
        self.embed = TimeClassEmbedding(emb_dim, time_scale, num_classes, guidance_embed=guidance_embed,
                                        steps_embed=steps_embed)
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        chans = [base]
        ch = base
        self.down = nn.ModuleList()
        for lvl, m in enumerate(mults):
            for _ in range(num_res):
                self.down.append(ResBlock(ch, base * m, emb_dim, dropout))
                ch = base * m
                chans.append(ch)
            if lvl < len(mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                chans.append(ch)
        self.mid1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = SelfAttention(ch, heads)
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout)
        self.up = nn.ModuleList()
        for lvl, m in reversed(list(enumerate(mults))):
            for _ in range(num_res + 1):
                self.up.append(ResBlock(ch + chans.pop(), base * m, emb_dim, dropout))
                ch = base * m
            if lvl > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.up.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)

    def forward(self, x, t, cond=None, guidance=None, steps=None):
        emb = F.silu(self.embed(t, cond, x.dtype, guidance, steps))
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def bottleneck(self) -> nn.Module:
        """The layer whose output GAN heads read (DMD2): the bottleneck, after the middle attention."""
        return self.mid2

    def config(self) -> dict:
        return dict(self._config)
