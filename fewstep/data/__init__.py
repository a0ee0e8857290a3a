"""Built-in data (2-D toys, scikit-learn digits) and users' image folders behind one interface."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fewstep.data.digits import load_digits_tensors
from fewstep.data.images import load_image_folder
from fewstep.data.toy import TOY_NAMES, sample_toy
from fewstep.errors import FewstepError

DATA_NAMES = tuple(f"toy:{n}" for n in TOY_NAMES) + ("digits", "digits16")

# Held-out sets for toy data use seeds far from any training stream.
REFERENCE_SEED = 1_000_003


@dataclass
class DataSource:
    """A dataset: draw training batches, or a held-out reference set for evaluation."""

    name: str
    kind: str  # "2d" or "image"
    shape: tuple[int, ...]
    num_classes: int | None = None
    x: torch.Tensor | None = None  # finite datasets: all training items
    y: torch.Tensor | None = None
    x_ref: torch.Tensor | None = None
    y_ref: torch.Tensor | None = None

    @property
    def finite(self) -> bool:
        return self.x is not None

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A training batch (x, labels or None)."""
        if not self.finite:
            return sample_toy(self.name.removeprefix("toy:"), n, generator), None
        idx = torch.randint(0, self.x.shape[0], (n,), generator=generator)
        return self.x[idx], (self.y[idx] if self.y is not None else None)

    def reference(self, n: int | None = None, seed: int = REFERENCE_SEED):
        """Held-out data for metrics: fresh samples (toys) or the reference split (finite data)."""
        if not self.finite:
            return sample_toy(self.name.removeprefix("toy:"), n or 4096, seed=seed), None
        x, y = self.x_ref, self.y_ref
        if n is not None and n < x.shape[0]:
            idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
            return x[idx], (y[idx] if y is not None else None)
        return x, y


def canonical_data_name(name: str) -> str:
    if name in TOY_NAMES:
        return f"toy:{name}"
    return name


def get_data(name: str, resolution: int | None = None, channels: int = 3) -> DataSource:
    """A DataSource by built-in name (toy:checkerboard, digits, digits16, ...) or image folder path."""
    name = canonical_data_name(str(name))
    if name.startswith("toy:"):
        if name.removeprefix("toy:") not in TOY_NAMES:
            raise FewstepError(f"unknown data {name!r}; allowed: {', '.join(DATA_NAMES)} or an image folder")
        return DataSource(name=name, kind="2d", shape=(2,))
    if name in ("digits", "digits16"):
        res = 16 if name == "digits16" else (resolution or 8)
        x, y = load_digits_tensors("train", res)
        xr, yr = load_digits_tensors("all", res)
        return DataSource(name=name, kind="image", shape=tuple(x.shape[1:]), num_classes=10, x=x, y=y,
                          x_ref=xr, y_ref=yr)
    path = Path(name)
    if path.is_dir():
        x, y, classes = load_image_folder(path, resolution or 32, channels)
        return DataSource(name=str(path), kind="image", shape=tuple(x.shape[1:]),
                          num_classes=len(classes) or None, x=x, y=y, x_ref=x, y_ref=y)
    raise FewstepError(f"unknown data {name!r}; allowed: {', '.join(DATA_NAMES)} or an image folder")


__all__ = ["DATA_NAMES", "DataSource", "get_data", "load_digits_tensors", "load_image_folder", "sample_toy"]
