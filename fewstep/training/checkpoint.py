"""Training checkpoints: what goes in one (`training_state` / `restore_training_state`), and the files
(safetensors + JSON, written atomically, never unpickled).

The state of a run is every trained network and EMA target (by role), the student's sampling EMA, each
optimizer's moments, the run's random generator and the global torch (and CUDA) RNG of every rank, the fp16
loss scaler, the method's own JSON state, the iteration, the smoothed losses and the training time: resuming
from it continues bit-exactly on CPU.

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


# -- the state of a run ------------------------------------------------------------------------------
def training_state(trainer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON-able meta) of a Trainer's state; every rank's RNG streams are gathered (a collective:
    every rank calls this)."""
    acc = trainer.accelerator
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"optimizers": {}, "loss_avg": trainer.loss_avg, "elapsed_s": trainer.elapsed,
                  "world_size": trainer.world, "method_state": trainer.method.state_dict()}
    for name, role in trainer.roles.items():
        if role.trainable or role.ema_of:
            for k, v in role.module.state_dict().items():
                tensors[f"net.{name}.{k}"] = v
    if trainer.ema is not None:
        for k, v in trainer.ema.state_dict().items():
            tensors[f"ema.student.{k}"] = v
    for name, opt in trainer.opts.items():
        t, m = flatten_optimizer(f"opt.{name}", opt.state_dict())
        tensors.update(t)
        meta["optimizers"][name] = m
    gen_state = trainer.gen.get_state()
    cpu_state = torch.get_rng_state()
    if trainer.world > 1:  # every rank's streams, so a resumed multi-process run continues each of them
        gen_state = acc.gather(gen_state.to(trainer.device)[None]).cpu()
        cpu_state = acc.gather(cpu_state.to(trainer.device)[None]).cpu()
    else:
        gen_state, cpu_state = gen_state[None], cpu_state[None]
    tensors["rng.generator"], tensors["rng.torch"] = gen_state, cpu_state
    if trainer.device.type == "cuda":
        cuda_state = torch.cuda.get_rng_state(trainer.device)
        tensors["rng.cuda"] = (acc.gather(cuda_state.to(trainer.device)[None]).cpu() if trainer.world > 1
                               else cuda_state[None])
    if getattr(acc, "scaler", None) is not None:  # fp16 loss scaling
        meta["scaler"] = acc.scaler.state_dict()
    return tensors, meta


def restore_training_state(trainer, path: Path | None) -> None:
    """Load checkpoint `path` into a Trainer built from the same config (one-line errors when it does not fit)."""
    if path is None:
        raise FewstepError(f"nothing to resume in {str(trainer.out)!r}: it has no complete checkpoint")
    tensors, meta = load_checkpoint(path)
    if meta.get("world_size", 1) != trainer.world:
        raise FewstepError(f"{str(path)!r} was written by {meta.get('world_size')} processes; resume it with "
                           f"the same number (this launch has {trainer.world})")

    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    for name, role in trainer.roles.items():
        if role.trainable or role.ema_of:
            saved, own = part(f"net.{name}."), set(role.module.state_dict())
            missing, extra = sorted(own - set(saved)), sorted(set(saved) - own)
            if missing or extra:  # a checkpoint from other options or an older version: say which keys
                hint = (" (a TDM run from before the step-count input: add `steps_embed: false` under "
                        "options in its config.yaml)" if any("steps_mlp" in k for k in missing) else "")
                raise FewstepError(f"{str(path)!r} does not fit this run's {name!r} network: missing "
                                   f"{missing[:3]}, unexpected {extra[:3]}; resume with the options it was "
                                   f"written with{hint}")
            role.module.load_state_dict(saved)
    if trainer.ema is not None:
        trainer.ema.load_state_dict(part("ema.student."))
    for name, opt in trainer.opts.items():
        state = unflatten_optimizer(f"opt.{name}", tensors, meta["optimizers"][name])
        for saved, own in zip(state["param_groups"], opt.param_groups, strict=False):
            # the update kernel is this device's (fused on CUDA, foreach on the CPU), not the checkpoint's
            saved.update({k: own[k] for k in ("fused", "foreach") if k in own})
        opt.load_state_dict(state)
    trainer.gen.set_state(tensors["rng.generator"][trainer.rank].clone())
    torch.set_rng_state(tensors["rng.torch"][trainer.rank].clone())
    if "rng.cuda" in tensors and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"][trainer.rank].clone(), trainer.device)
    if meta.get("scaler") and getattr(trainer.accelerator, "scaler", None) is not None:
        trainer.accelerator.scaler.load_state_dict(meta["scaler"])
    trainer.method.load_state_dict(meta.get("method_state") or {})
    trainer.iteration = int(meta["iteration"])
    trainer.loss_avg = dict(meta.get("loss_avg", {}))
    trainer.elapsed = float(meta.get("elapsed_s", 0.0))
