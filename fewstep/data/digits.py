"""scikit-learn's bundled handwritten digits (1797 grey 8x8 images, 10 classes), offline.

Pixels 0..16 are mapped to [-1, 1]. At 16x16 the images are upsampled bilinearly. A fixed
permutation (seed 0) splits the set into 1497 training and 300 test images.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from fewstep.errors import FewstepError

NUM_TEST = 300
DIGITS_RESOLUTIONS = (8, 16)


@lru_cache(maxsize=1)
def _raw_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


def resize_digits(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize of (N, 1, H, W) digit images to resolution x resolution."""
    if x.shape[-1] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                         antialias=resolution < x.shape[-1])


def load_digits_tensors(split: str = "train", resolution: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, R, R) in [-1, 1], labels (N,)) for split train | test | all."""
    if resolution not in DIGITS_RESOLUTIONS:
        raise FewstepError(f"digits resolution must be one of {DIGITS_RESOLUTIONS}, got {resolution}")
    x, y = _raw_digits()
    if split == "train":
        x, y = x[NUM_TEST:], y[NUM_TEST:]
    elif split == "test":
        x, y = x[:NUM_TEST], y[:NUM_TEST]
    elif split != "all":
        raise FewstepError(f"unknown split {split!r}; allowed: train, test, all")
    return resize_digits(x, resolution).contiguous(), y.clone()
