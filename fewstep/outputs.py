"""Reading and writing sample sets: .npz for any data, PNG files plus a grid for images.

Writes are atomic (temporary name, then rename) and never replace existing files: a command
that fails writes nothing, and a command never overwrites what an earlier one produced.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from fewstep.errors import FewstepError
from fewstep.fileio import atomic_write

SAMPLES_NPZ = "samples.npz"
GRID_PNG = "grid.png"


def ensure_new_path(path: str | Path, what: str = "output") -> Path:
    """Refuse to write over an existing file or a non-empty directory."""
    path = Path(path)
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise FewstepError(f"{what} {str(path)!r} already exists; choose a new path (nothing is overwritten)")
    return path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1):
    """A PIL image tiling (N, C, H, W) images in [-1, 1] into rows of `nrow`."""
    from PIL import Image

    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    canvas = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y0:y0 + h, x0:x0 + w] = arr[i]
    im = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    return im


def scatter_png(points: torch.Tensor, size: int = 512, extent: float | None = None):
    """A PIL image of 2-D points (darker = denser) for a quick look at toy samples."""
    from PIL import Image

    p = points.detach().float().cpu().numpy()
    lim = extent or float(np.quantile(np.abs(p), 0.999)) * 1.1 + 1e-6
    hist, _, _ = np.histogram2d(p[:, 1], p[:, 0], bins=size, range=[[-lim, lim], [-lim, lim]])
    hist = np.flipud(hist)
    shade = 1.0 - np.clip(hist / max(np.quantile(hist[hist > 0], 0.95) if (hist > 0).any() else 1, 1), 0, 1)
    return Image.fromarray((shade * 255).astype(np.uint8))


def save_npz(path: Path, samples: torch.Tensor, labels: torch.Tensor | None, meta: dict) -> None:
    arrays = {"samples": samples.detach().float().cpu().numpy(), "meta": np.array(json.dumps(meta))}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def save_samples(out: str | Path, samples: torch.Tensor, labels: torch.Tensor | None, meta: dict,
                 write_pngs: bool = True) -> dict:
    """Write a sample set; returns {"kind": "npz"|"images", "paths": {...}}.

    2-D data: `out` is an .npz file (samples, labels, meta) and a scatter PNG beside it.
    Images: `out` is a new directory with one PNG per sample, grid.png and samples.npz (exact floats).
    """
    out = ensure_new_path(out)
    if samples.ndim == 2:
        if out.suffix != ".npz":
            raise FewstepError(f"2-D samples are written as .npz; got --out {str(out)!r} (use e.g. samples.npz)")
        save_npz(out, samples, labels, meta)
        png = out.with_suffix(".png")
        if not png.exists():
            atomic_write(png, lambda tmp: scatter_png(samples).save(tmp, format="PNG"))
        return {"kind": "npz", "paths": {"samples": str(out), "plot": str(png)}}
    if samples.ndim != 4:
        raise FewstepError(f"cannot save samples of shape {tuple(samples.shape)}: expected (N, 2) or (N, C, H, W)")
    if out.suffix == ".npz":
        save_npz(out, samples, labels, meta)
        return {"kind": "npz", "paths": {"samples": str(out)}}
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_npz(staging / SAMPLES_NPZ, samples, labels, meta)
        nrow = min(16, max(1, int(math.ceil(math.sqrt(min(256, samples.shape[0]))))))
        image_grid(samples[:256], nrow=nrow, scale=max(1, 128 // samples.shape[-1])).save(staging / GRID_PNG)
        if write_pngs:
            from PIL import Image

            arr = to_uint8(samples)
            width = max(5, len(str(samples.shape[0] - 1)))
            for i, a in enumerate(arr):
                Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(staging / f"{i:0{width}d}.png")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return {"kind": "images", "paths": {"dir": str(out), "grid": str(out / GRID_PNG),
                                        "samples": str(out / SAMPLES_NPZ)}}


def load_samples(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Read samples written by `save_samples` (.npz or an image directory) or a folder of PNGs.

    Returns (samples, labels or None, meta). Images come back in [-1, 1] as (N, C, H, W).
    """
    path = Path(path)
    if path.is_dir() and (path / SAMPLES_NPZ).is_file():
        path = path / SAMPLES_NPZ
    if path.is_file():
        if path.suffix != ".npz":
            raise FewstepError(f"samples file {str(path)!r} is not an .npz file")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "samples" not in z:
                    raise FewstepError(f"{str(path)!r} has no 'samples' array")
                samples = torch.from_numpy(np.array(z["samples"], dtype=np.float32))
                labels = torch.from_numpy(np.array(z["labels"])).long() if "labels" in z else None
                meta = json.loads(str(z["meta"])) if "meta" in z else {}
        except (OSError, ValueError) as e:
            raise FewstepError(f"cannot read samples from {str(path)!r}: {e}") from None
        return samples, labels, meta
    if path.is_dir():
        from PIL import Image

        from fewstep.data.images import list_images

        files = [p for p in list_images(path) if p.name != GRID_PNG]
        arrs = []
        for p in files:
            with Image.open(p) as im:
                a = np.asarray(im.convert("L") if im.mode in ("L", "LA", "I", "1") else im.convert("RGB"))
            arrs.append(a[..., None] if a.ndim == 2 else a)
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x, None, {}
    raise FewstepError(f"samples {str(path)!r} not found (expected an .npz file or a directory of images)")
