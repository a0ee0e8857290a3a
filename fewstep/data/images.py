"""A folder of the user's own images as a tensor dataset.

Images (png, jpg, jpeg, webp, bmp) are centre-cropped to a square, resized with PIL bicubic
(antialiased) to the requested resolution and scaled to [-1, 1]. If every image lies in a
subfolder, the subfolder names become class labels (sorted), as in torchvision's ImageFolder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fewstep.errors import FewstepError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def list_images(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FewstepError(f"image folder {str(root)!r} does not exist or is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FewstepError(f"image folder {str(root)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def load_image(path: Path, resolution: int, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def load_image_folder(
    root: str | Path, resolution: int = 32, channels: int = 3
) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """(images (N, C, R, R) in [-1, 1], labels or None, class names)."""
    if channels not in (1, 3):
        raise FewstepError(f"channels must be 1 or 3, got {channels}")
    root = Path(root)
    files = list_images(root)
    parents = {p.parent for p in files}
    labelled = root not in parents and all(p.parent.parent == root for p in files)
    x = torch.from_numpy(np.stack([load_image(p, resolution, channels) for p in files]))
    if not labelled:
        return x, None, []
    classes = sorted({p.parent.name for p in files})
    y = torch.tensor([classes.index(p.parent.name) for p in files], dtype=torch.long)
    return x, y, classes
