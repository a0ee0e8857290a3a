"""Training checkpoints: safetensors + JSON, written atomically, never unpickled.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` holding `state.safetensors` (weights,
optimizer moments, RNG states) and `state.json` (iteration, optimizer hyperparameters, counters).
It is assembled in a hidden temporary directory, flushed to disk, and renamed into place in one
step, so a run killed during a save leaves either the previous checkpoints or a complete new one;
leftover temporary directories are ignored and removed. Older checkpoints are deleted only after
the new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fewstep.errors import FewstepError

CHECKPOINTS = "checkpoints"
STATE = "state.safetensors"
META = "state.json"
PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def flatten_optimizer(prefix: str, state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in state_dict["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars,
                     "indices": [int(i) for i in state_dict["state"]]}


def unflatten_optimizer(prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(i): {} for i in meta["indices"]}
    head = prefix + "."
    for key, v in tensors.items():
        if key.startswith(head):
            idx, name = key[len(head):].split(".", 1)
            state[int(idx)][name] = v
    for idx, vals in meta["scalars"].items():
        state[int(idx)].update(vals)
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and (p / META).is_file() and (p / STATE).is_file():
            try:
                found.append((int(p.name[len(PREFIX):]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: str | Path, iteration: int, tensors: dict[str, torch.Tensor], meta: dict,
                    keep: int = 2, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write checkpoint `iteration` atomically and keep only the newest `keep` checkpoints."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{iteration:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(state, str(tmp / STATE))
        files = {META: json.dumps({**meta, "iteration": iteration}, indent=1).encode()}
        files.update(extra_files or {})
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a checkpoint of the same iteration (e.g. re-saved at the end): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial_checkpoints(run_dir: str | Path) -> int:
    """Delete temporary directories left by a save that was killed; returns how many."""
    root = Path(run_dir) / CHECKPOINTS
    n = 0
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path / STATE))
        meta = json.loads((path / META).read_text())
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise FewstepError(f"checkpoint {str(path)!r} is unreadable: {e}") from None
    return tensors, meta
