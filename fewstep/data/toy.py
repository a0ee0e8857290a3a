"""Built-in 2-D toy distributions, sampled exactly (no data files).

Each sampler draws from a fixed torch.Generator, so a seed names a reproducible sample set:
training streams and held-out reference sets simply use different seeds.
"""

from __future__ import annotations

import math

import torch

from fewstep.errors import FewstepError

TOY_NAMES = ("checkerboard", "gaussians8", "moons", "spirals")

GAUSSIANS8_RADIUS = 2.0
GAUSSIANS8_STD = 0.1


def gaussians8_centers() -> torch.Tensor:
    """The 8 mode centres on a circle of radius 2 (angles k pi/4)."""
    ang = torch.arange(8, dtype=torch.float32) * (math.pi / 4)
    return GAUSSIANS8_RADIUS * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)


def _checkerboard(n, g):
    # 4x4 board on [-2, 2]^2, the 8 squares where floor(x) + floor(y) is even (FFJORD's toy).
    x = torch.rand(n, generator=g) * 4 - 2
    y = torch.rand(n, generator=g) - 2 * torch.randint(0, 2, (n,), generator=g).float()
    y = y + torch.floor(x) % 2
    return torch.stack([x, y], dim=1)


def _gaussians8(n, g):
    k = torch.randint(0, 8, (n,), generator=g)
    return gaussians8_centers()[k] + GAUSSIANS8_STD * torch.randn(n, 2, generator=g)


def _moons(n, g):
    upper = torch.rand(n, generator=g) < 0.5
    theta = torch.rand(n, generator=g) * math.pi
    xo, yo = torch.cos(theta), torch.sin(theta)
    xi, yi = 1 - torch.cos(theta), 0.5 - torch.sin(theta)
    x = torch.where(upper, xo, xi)
    y = torch.where(upper, yo, yi)
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.5
    return pts + 0.05 * 1.5 * torch.randn(n, 2, generator=g)


def _spirals(n, g):
    s = torch.sqrt(torch.rand(n, generator=g)) * 3 * math.pi
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x = -torch.cos(s) * s
    y = torch.sin(s) * s
    pts = sign[:, None] * torch.stack([x, y], dim=1) / 3.0
    return pts + 0.08 * torch.randn(n, 2, generator=g)


_SAMPLERS = {"checkerboard": _checkerboard, "gaussians8": _gaussians8, "moons": _moons, "spirals": _spirals}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None, seed: int | None = None) -> torch.Tensor:
    """n points (float32, shape (n, 2)) from the toy distribution `name`."""
    if name not in _SAMPLERS:
        raise FewstepError(f"unknown toy dataset {name!r}; allowed: {', '.join(TOY_NAMES)}")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    return _SAMPLERS[name](int(n), generator).float()
