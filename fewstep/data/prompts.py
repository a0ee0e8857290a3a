"""Prompts (and image-caption pairs) for text-to-image teachers, with their conditions cached on disk.

Prompt files: ``.txt`` (one prompt per line), ``.jsonl`` (one object per line with a ``prompt``,
``text`` or ``caption`` field, optionally ``image``/``file_name``; or a bare JSON string) or ``.csv``
(a header with one of those columns). A folder holds images with their captions in ``metadata.jsonl``
or ``metadata.csv`` (Hugging Face's imagefolder layout) or in a ``.txt`` file beside each image.
Image paths are relative to the file (or folder) that names them.

`TextConditionSource` is the trainer's data source for text teachers: its ``sample(n, generator)``
returns (x0 latents or None, conditions) for n rows drawn uniformly with the run's generator. The
conditions of every prompt (the teacher pipeline's own prompt encoder) and, for methods that train on
real data, the VAE latents of every image are computed once and cached as safetensors files named by
a hash of the encoders and the inputs, so a resumed or repeated run reuses them.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fewstep.data.images import IMAGE_SUFFIXES
from fewstep.errors import FewstepError
from fewstep.fileio import atomic_write

PROMPT_FIELDS = ("prompt", "text", "caption")
IMAGE_FIELDS = ("image", "file_name", "path")
PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    image: Path | None = None


def _pick(record: dict, fields, where: str, what: str, required: bool):
    for f in fields:
        if f in record and record[f] is not None:
            return record[f]
    if required:
        raise FewstepError(f"{where} has no {what} field; allowed: {', '.join(fields)}")
    return None


def _rows_from_records(records, base: Path, where: str) -> list[PromptRow]:
    rows = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            rows.append(PromptRow(rec))
            continue
        if not isinstance(rec, dict):
            raise FewstepError(f"{where}: entry {i + 1} is neither an object nor a string")
        prompt = _pick(rec, PROMPT_FIELDS, f"{where} (entry {i + 1})", "prompt", required=True)
        image = _pick(rec, IMAGE_FIELDS, where, "image", required=False)
        rows.append(PromptRow(str(prompt), (base / str(image)) if image else None))
    return rows


def read_prompt_rows(path: str | Path) -> list[PromptRow]:
    """Prompts (and image paths) from a .txt/.jsonl/.csv file or an image-caption folder."""
    path = Path(path)
    if path.is_dir():
        return _caption_folder(path)
    if not path.is_file():
        raise FewstepError(f"prompt file {str(path)!r} does not exist (a .txt, .jsonl or .csv file, or an image folder "
                           "with metadata.jsonl)")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FewstepError(f"{str(path)!r} line {n} is not JSON: {e.msg}") from None
        rows = _rows_from_records(records, path.parent, repr(str(path)))
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not any(f in reader.fieldnames for f in PROMPT_FIELDS):
            raise FewstepError(f"{str(path)!r} needs a header with a prompt column; allowed: "
                               f"{', '.join(PROMPT_FIELDS)}")
        rows = _rows_from_records(list(reader), path.parent, repr(str(path)))
    elif suffix == ".txt":
        rows = [PromptRow(line.strip()) for line in text.splitlines() if line.strip()]
    else:
        raise FewstepError(f"unknown prompt file type {str(path)!r}; allowed: {', '.join(PROMPT_SUFFIXES)} or a folder")
    if not rows:
        raise FewstepError(f"{str(path)!r} holds no prompts")
    for r in rows:
        if r.image is not None and not r.image.is_file():
            raise FewstepError(f"image {str(r.image)!r} named in {str(path)!r} does not exist")
    return rows


def _caption_folder(root: Path) -> list[PromptRow]:
    for name in METADATA_FILES:
        if (root / name).is_file():
            rows = read_prompt_rows(root / name)
            if any(r.image is None for r in rows):
                raise FewstepError(f"every entry of {str(root / name)!r} needs an image (file_name) field")
            return rows
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    rows = [PromptRow(p.with_suffix(".txt").read_text(encoding="utf-8").strip(), p) for p in images
            if p.with_suffix(".txt").is_file()]
    if not rows:
        raise FewstepError(f"folder {str(root)!r} has no captions: add metadata.jsonl (file_name, text) or a .txt "
                           "caption beside each image")
    return rows


def load_image_at(path: Path, height: int, width: int) -> np.ndarray:
    """(3, H, W) in [-1, 1]: resized (bicubic, antialiased) to cover H x W, then centre-cropped."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = max(height / h, width / w)
        nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - width) // 2, (nh - height) // 2
        im = im.crop((left, top, left + width, top + height))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return arr.transpose(2, 0, 1)


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"fewstep": json.dumps(meta)}))


ROW_INDEX = "__row_index"


def conditions_cache_path(parts, prompts: list[str], cache_dir: Path) -> Path:
    return Path(cache_dir) / f"text-{_digest('text', parts.fingerprint(), prompts)}.safetensors"


def latents_cache_path(parts, images: list[Path], cache_dir: Path) -> Path:
    stamps = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in images]
    key = _digest("latents", parts.fingerprint(), list(parts.resolution), stamps)
    return Path(cache_dir) / f"latents-{key}.safetensors"


def cached_conditions(parts, prompts: list[str], cache_dir: Path, batch_size: int = 32) -> Path:
    """The cache file holding the conditions of `prompts` (each distinct prompt encoded once; ROW_INDEX maps
    file rows to them), computed if missing."""
    path = conditions_cache_path(parts, prompts, cache_dir)
    if not path.is_file():
        unique = list(dict.fromkeys(prompts))
        position = {p: i for i, p in enumerate(unique)}
        cond = parts.encode_prompts(unique, batch_size=batch_size, cache=False)  # on disk: not kept in memory too
        cond[ROW_INDEX] = torch.tensor([position[p] for p in prompts], dtype=torch.long)
        _save_tensors(path, cond, {"prompts": len(prompts), "distinct": len(unique)})
    return path


def cached_latents(parts, images: list[Path], cache_dir: Path, batch_size: int = 8) -> Path:
    """The cache file holding the VAE latents of `images` at the parts' resolution, computed if missing."""
    path = latents_cache_path(parts, images, cache_dir)
    if not path.is_file():
        h, w = parts.resolution
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.stack([load_image_at(p, h, w) for p in images[i:i + batch_size]]))
            out.append(parts.encode_images(x, batch_size=batch_size))
        _save_tensors(path, {"latents": torch.cat(out)}, {"images": len(images)})
    return path


class TextConditionSource:
    """Conditions (and real latents) for a text teacher's training batches; see the module docstring."""

    yields_conditions = True

    def __init__(self, rows: list[PromptRow], parts, cache_dir: str | Path, *, need_images: bool = False):
        if need_images and any(r.image is None for r in rows):
            raise FewstepError("this method trains on real images: give image-caption pairs (--data FOLDER with "
                               "metadata.jsonl, or a .jsonl/.csv with image and prompt columns)")
        self.rows = rows
        self.parts = parts
        self.cache_dir = Path(cache_dir)
        self.need_images = need_images
        self._cond = self._latents = None

    def __len__(self) -> int:
        return len(self.rows)

    def prepare(self, compute: bool = True) -> None:
        """Compute the caches (when `compute`: the main process) or only open them (the others, after it)."""
        from safetensors.torch import load_file

        prompts = [r.prompt for r in self.rows]
        images = [r.image for r in self.rows] if self.need_images else None
        if compute:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            cond_path = cached_conditions(self.parts, prompts, self.cache_dir)
            lat_path = cached_latents(self.parts, images, self.cache_dir) if images else None
        else:
            cond_path = conditions_cache_path(self.parts, prompts, self.cache_dir)
            lat_path = latents_cache_path(self.parts, images, self.cache_dir) if images else None
        cond = load_file(str(cond_path))
        self._row_index = cond.pop(ROW_INDEX)
        self._cond = cond
        if lat_path is not None:
            self._latents = load_file(str(lat_path))["latents"]
        self.cache_files = [str(p) for p in (cond_path, lat_path) if p is not None]

    def conditions(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Conditions of rows `index` of the prompt list."""
        if self._cond is None:
            self.prepare()
        rows = self._row_index[index]
        return {k: v[rows] for k, v in self._cond.items()}

    def sample(self, n: int, generator: torch.Generator):
        """(x0 latents or None, conditions) of n rows drawn uniformly with `generator`."""
        if self._cond is None:
            self.prepare()
        idx = torch.randint(0, len(self.rows), (n,), generator=generator)
        x0 = self._latents[idx] if self.need_images else None
        return x0, self.conditions(idx)

    def grid_conditions(self, n: int) -> dict[str, torch.Tensor]:
        """Conditions of the first prompts, repeated to n rows (for sample grids)."""
        return self.conditions(torch.arange(n) % len(self.rows))


def text_condition_source(parts, *, prompts: str | None, data: str | None, need_images: bool,
                          cache_dir: str | Path, method: str) -> TextConditionSource:
    """The source for a text teacher: image-caption pairs from `data` (needed by methods that train on real
    images) and/or prompts from `prompts`."""
    if need_images:
        if data is None:
            raise FewstepError(f"method {method!r} trains on real images: pass --data with image-caption pairs (a "
                               "folder with metadata.jsonl, or a .jsonl/.csv with image and prompt columns)")
        rows = read_prompt_rows(data)
    elif prompts is not None:
        rows = read_prompt_rows(prompts)
    elif data is not None:
        rows = read_prompt_rows(data)
    else:
        raise FewstepError("a text-to-image teacher needs prompts: pass --prompts FILE (.txt one per line, .jsonl or "
                           ".csv) or --data with image-caption pairs")
    return TextConditionSource(rows, parts, cache_dir, need_images=need_images)
