"""Sample sources for feature-space metrics (FID, KID, precision/recall, CLIP score): a folder of images (streamed
from disk), an .npz written by `fewstep sample`, or a model (built-in teacher name, model directory or distillation
run, loaded with `fewstep.teachers.load_model`) sampled on the fly with the shared sampler engine, exactly as
`fewstep.sampling.generate` would (per-sample seeds, so batching does not change the samples).

Each source has `kind`, `total`, `describe()` (JSON-able) and `batches()` (uint8 or [-1, 1] image batches, or a
list of differently sized images).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fewstep.errors import FewstepError
from fewstep.sampling.generation import model_device, model_dtype
from fewstep.teachers import load_model

__all__ = ["ImageFolderSamples", "ModelSamples", "NpzSamples", "looks_like_model_dir", "open_samples"]


class ImageFolderSamples:
    """Images in a folder (recursively; png, jpg, jpeg, webp, bmp; a `grid.png` from `fewstep sample` is
    skipped), read batch by batch as uint8. Greyscale files stay 1-channel (repeated to 3 later)."""

    kind = "images"

    def __init__(self, path: str | Path, batch_size: int = 64):
        from fewstep.data.images import list_images
        from fewstep.outputs import GRID_PNG

        self.path = Path(path)
        self.files = [p for p in list_images(self.path) if not (p.name == GRID_PNG and p.parent == self.path)]
        if not self.files:
            raise FewstepError(f"image folder {str(self.path)!r} holds no images besides {GRID_PNG}")
        self.batch_size = batch_size
        self.total = len(self.files)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "num": self.total}

    def batches(self) -> Iterator[torch.Tensor | list]:
        from PIL import Image

        for i in range(0, self.total, self.batch_size):
            arrs = []
            for p in self.files[i:i + self.batch_size]:
                try:
                    with Image.open(p) as im:
                        grey = im.mode in ("L", "LA", "I", "I;16", "1", "P") and _is_grey(im)
                        a = np.asarray(im.convert("L") if grey else im.convert("RGB"))
                except OSError as e:
                    raise FewstepError(f"cannot read image {str(p)!r}: {e}") from None
                arrs.append(torch.from_numpy(np.array(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))))
            yield _stack_or_list(arrs)


def _is_grey(im) -> bool:
    if im.mode != "P":
        return True
    rgb = np.asarray(im.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def _stack_or_list(arrs: list[torch.Tensor]):
    """One (N, C, H, W) tensor when the shapes agree, else the list (resized one by one)."""
    if all(a.shape == arrs[0].shape for a in arrs):
        return torch.stack(arrs)
    return arrs


class NpzSamples:
    """The `samples` array (N, C, H, W) in [-1, 1] of an .npz written by `fewstep sample`."""

    kind = "npz"

    def __init__(self, path: str | Path, batch_size: int = 64):
        from fewstep.outputs import load_samples

        self.path = Path(path)
        samples, _, self.meta = load_samples(self.path)
        if samples.ndim != 4:
            raise FewstepError(f"{str(self.path)!r} holds samples of shape {tuple(samples.shape)}; Inception "
                               "features need images (N, C, H, W)")
        self.samples = samples
        self.batch_size = batch_size
        self.total = int(samples.shape[0])

    def describe(self) -> dict:
        out = {"kind": self.kind, "path": str(self.path), "num": self.total}
        for k in ("model", "steps", "solver", "seed"):
            if k in self.meta:
                out[k] = self.meta[k]
        return out

    def batches(self):
        for i in range(0, self.total, self.batch_size):
            yield self.samples[i:i + self.batch_size]


class ModelSamples:
    """`num` samples of a model drawn batch by batch with the shared sampler engine.

    Batch b holds samples start..start+count with the per-sample seeds of `sample_seeds(seed, start,
    count)` and (class-conditional models) labels i % num_classes: the same samples that
    `fewstep.sampling.generate(model, num, ...)` returns, without keeping them all.
    """

    kind = "model"

    def __init__(self, spec: str, num: int, *, steps: int | None = None, solver: str | None = None,
                 spacing: str | None = None, seed: int = 0, batch_size: int = 64, guidance: float | None = None,
                 device=None, dtype=None):
        from fewstep.sampling import sampler_settings

        if num is None or int(num) < 2:
            raise FewstepError(f"--num must be >= 2 when sampling a model, got {num}")
        if steps is not None and int(steps) < 1:
            raise FewstepError(f"--steps must be >= 1, got {steps}")
        if batch_size < 1:
            raise FewstepError(f"--batch-size must be >= 1, got {batch_size}")
        from fewstep.devices import dtype_name

        self.spec = str(spec)
        den = load_model(self.spec, "auto" if device is None else device, dtype="auto" if dtype is None else dtype)
        if den.data_shape is None or len(den.data_shape) != 3:
            raise FewstepError(f"model {self.spec!r} does not generate images (data shape {den.data_shape}); "
                               "FID needs images")
        if den.cond_kind == "text":
            raise FewstepError(f"model {self.spec!r} is text-conditional: sample it with prompts and pass the "
                               "image folder as --samples")
        self.denoiser = den
        self.device, self.dtype = str(model_device(den)), dtype_name(model_dtype(den))
        settings = sampler_settings(den, steps=steps, solver=solver, guidance=guidance, spacing=spacing)
        self.steps, self.solver, self.renoise = settings.steps, settings.solver, settings.renoise
        self.spacing, self.timesteps = settings.spacing, settings.timesteps
        self.seed, self.batch_size, self.guidance = int(seed), int(batch_size), settings.guidance
        self.total = int(num)

    def describe(self) -> dict:
        return {"kind": self.kind, "model": self.spec, "num": self.total, "steps": self.steps, "solver": self.solver,
                "spacing": self.spacing, "renoise": self.renoise, "seed": self.seed, "guidance": self.guidance,
                "device": self.device, "dtype": self.dtype}

    @torch.no_grad()
    def batches(self):
        from fewstep.sampling import noise_for_seeds, sample, sample_seeds

        den = self.denoiser
        dtype, device = model_dtype(den), model_device(den)
        den.eval()
        for start in range(0, self.total, self.batch_size):
            count = min(self.batch_size, self.total - start)
            seeds = sample_seeds(self.seed, start, count)
            noise = noise_for_seeds(seeds, den.data_shape, dtype=dtype, device=device)
            cond = None
            if den.cond_kind == "class":
                cond = (torch.arange(start, start + count) % int(den.num_classes)).to(device)
            x = sample(den, noise, timesteps=self.timesteps, solver=self.solver, cond=cond, guidance=self.guidance,
                       renoise=self.renoise, seeds=seeds)
            yield x.to(torch.promote_types(x.dtype, torch.float32)).cpu()


def looks_like_model_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("config.json", "config.yaml", "model.safetensors"))


def open_samples(spec, *, num: int | None = None, steps: int | None = None, solver: str | None = None,
                 seed: int = 0, batch_size: int = 64, guidance: float | None = None, device=None, dtype=None):
    """A sample source for `spec`: an .npz file, an image folder, or a model (name, model or run directory).

    A directory with config.json / config.yaml / model.safetensors is a model; other directories are
    image folders (or, with no images but grid.png, the samples.npz `fewstep sample` wrote there).
    Sampling options apply to models only (`device`, `dtype`: where and in what precision the model runs, see
    `fewstep.teachers.load_model`; dtype None is auto: fp32 for the built-in networks).
    """
    path = Path(str(spec))
    if path.is_file():
        if path.suffix != ".npz":
            raise FewstepError(f"samples file {str(path)!r} is not an .npz (give an .npz, an image folder or a model)")
        src = NpzSamples(path, batch_size)
    elif path.is_dir() and not looks_like_model_dir(path):
        from fewstep.outputs import GRID_PNG, SAMPLES_NPZ

        from_pngs = any(p.name != GRID_PNG for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg",
                                                                                          ".webp", ".bmp")) \
            or not (path / SAMPLES_NPZ).is_file()
        # a folder written by `fewstep sample` without PNGs still has its samples.npz
        src = ImageFolderSamples(path, batch_size) if from_pngs else NpzSamples(path / SAMPLES_NPZ, batch_size)
    else:
        return ModelSamples(str(spec), num if num is not None else 0, steps=steps, solver=solver, seed=seed,
                            batch_size=batch_size, guidance=guidance, device=device, dtype=dtype)
    if num is not None and num != src.total:
        raise FewstepError(f"--num {num} applies to models; {str(path)!r} holds {src.total} images")
    return src
