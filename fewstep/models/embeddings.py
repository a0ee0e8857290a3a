"""Time and class embeddings shared by the built-in networks."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style sinusoidal features of a (B,) time tensor, computed in at least fp32 (DDPM, Ho et al.
    2020); float64 times stay float64 (exact forward-mode derivatives in fp64 checks)."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


class TimeClassEmbedding(nn.Module):
    """emb = MLP(sinusoidal(time_scale * t)) + class_embedding(label); label num_classes is the null class.

    The time embedding is computed in fp32 (sCM/rCM report instabilities otherwise, Lu & Song 2024;
    Zheng et al. 2025): the sinusoidal features always, and the time MLP outside autocast (in the
    parameters' dtype; bf16 mixed precision does not reach it). `jvp_keep_dtype`: a mixed-precision JVP pass
    (`fewstep.models.jvp.networks_in_dtype`) leaves its parameters in their precision too.
    """

    jvp_keep_dtype = True

    def __init__(self, dim: int, time_scale: float = 1000.0, num_classes: int | None = None, freq_dim: int = 128,
                 guidance_embed: bool = False, steps_embed: bool = False):
        super().__init__()
        self.time_scale = float(time_scale)
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes + 1, dim) if num_classes else None
        # LCM's guidance-scale input (Luo et al. 2023): MLP(sinusoidal(w)), last layer zero-initialised so a
        # student made from a teacher starts as the teacher's conditional prediction.
        self.guidance_mlp = None
        if guidance_embed:
            self.guidance_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            nn.init.zeros_(self.guidance_mlp[2].weight)
            nn.init.zeros_(self.guidance_mlp[2].bias)
        # A sampling-step-count input (TDM's sampling-steps-aware students, Luo et al. 2025): MLP(sinusoidal(K)),
        # zero-initialised likewise; a call without a step count adds nothing.
        self.steps_mlp = None
        if steps_embed:
            self.steps_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            nn.init.zeros_(self.steps_mlp[2].weight)
            nn.init.zeros_(self.steps_mlp[2].bias)

    def forward(self, t: torch.Tensor, labels: torch.Tensor | None, dtype: torch.dtype,
                guidance: torch.Tensor | None = None, steps: torch.Tensor | None = None) -> torch.Tensor:
        # Scale in fp32 (or fp64): t * 1000 in bf16 would round the time to a few units.
        t = t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t.to(torch.float32)
        feats = sinusoidal_embedding(t * self.time_scale, self.freq_dim)
        w = self.mlp[0].weight
        with torch.autocast(device_type=t.device.type, enabled=False):
            emb = self.mlp(feats.to(w.dtype))
        if self.class_emb is not None:
            if labels is None:
                labels = torch.full((t.shape[0],), self.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.class_emb(labels)
        if self.guidance_mlp is not None:
            if guidance is None:
                guidance = torch.ones(t.shape[0], device=t.device)
            g = torch.as_tensor(guidance, device=t.device, dtype=torch.float32).expand(t.shape[0])
            emb = emb + self.guidance_mlp(sinusoidal_embedding(g * 100.0, self.freq_dim).to(w.dtype))
        if self.steps_mlp is not None and steps is not None:
            k = torch.as_tensor(steps, device=t.device, dtype=torch.float32).expand(t.shape[0])
            emb = emb + self.steps_mlp(sinusoidal_embedding(k * 100.0, self.freq_dim).to(w.dtype))
        return emb.to(dtype)
