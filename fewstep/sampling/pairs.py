"""Teacher (noise, sample) pairs: the coupling z -> x = ODE_teacher(z) that reflow and DMD's regression loss train on.

Pair i holds the unit Gaussian noise z_i that `fewstep.sampling.generate` starts sample i from (per-sample
seeds, so a pair never depends on the batch it was made in), the teacher's ODE output x_i from that noise with
an accurate solver (Liu et al. 2023, "Flow straight and fast"), and its condition (class label i % num_classes
unless labels are given, as `generate` does).

In memory: `make_pairs(...) -> PairSet`. On disk (`generate_pairs`): a directory with `manifest.json` (teacher,
process, solver, steps, spacing, seed, guidance, shard size, number of pairs, data shape) and shards
`shard_00000.safetensors`, ... of `shard_size` pairs each (tensors `noise`, `x` and `cond` when conditional),
each written atomically. Shard j holds pairs j * shard_size ... and is computed in batches that start at its
first pair, so a shard's bytes do not depend on which shards were made before it: re-running the same command
makes only the missing shards (temporary files left by a killed run are discarded), and `worker`/`workers`
let several machines make disjoint shards (shard j belongs to worker j % workers) of one set.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.errors import FewstepError
from fewstep.fileio import atomic_write
from fewstep.sampling.generation import model_device, model_dtype
from fewstep.sampling.seeds import noise_for_seeds, sample_seeds
from fewstep.sampling.solvers import ODE_SOLVERS, resolve_timesteps, sample

PAIRS_FORMAT = "fewstep-pairs"
PAIRS_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_SIZE = 4096
# manifest entries that describe where the pairs came from but not what they are (may differ between runs)
_DESCRIPTIVE = ("teacher",)


def shard_name(index: int) -> str:
    return f"shard_{int(index):05d}.safetensors"


@dataclass
class PairSet:
    """Pairs in memory: `noise` (N, *shape) unit Gaussian z, `x` (N, *shape) the teacher's ODE output from z,
    `cond` (N, ...) or None; CPU tensors. `manifest` says how they were made."""

    noise: torch.Tensor
    x: torch.Tensor
    cond: torch.Tensor | None = None
    manifest: dict = field(default_factory=dict)

    def __post_init__(self):
        n = self.noise.shape[0]
        if self.x.shape != self.noise.shape or (self.cond is not None and self.cond.shape[0] != n):
            raise FewstepError(f"pairs disagree in size: noise {tuple(self.noise.shape)}, x {tuple(self.x.shape)}, "
                               f"cond {None if self.cond is None else tuple(self.cond.shape)}")

    def __len__(self) -> int:
        return int(self.noise.shape[0])

    def sample(self, n: int, generator: torch.Generator | None = None):
        """A random batch (noise, x, cond) of n pairs drawn uniformly with replacement using `generator`."""
        if len(self) == 0:
            raise FewstepError("cannot draw from an empty pair set")
        idx = torch.randint(0, len(self), (int(n),), generator=generator)
        return self.noise[idx], self.x[idx], (self.cond[idx] if self.cond is not None else None)


# -- making pairs ------------------------------------------------------------------------------------
def _check_args(teacher, num: int, steps, solver: str, batch_size: int, guidance: float) -> None:
    if solver not in ODE_SOLVERS:
        raise FewstepError(f"unknown pair solver {solver!r}; allowed: {', '.join(ODE_SOLVERS)} (an ODE solver: the "
                           "pairs are the teacher's deterministic coupling)")
    if steps is None or int(steps) < 1:
        raise FewstepError(f"pairs need steps >= 1, got {steps!r}")
    if int(num) < 1:
        raise FewstepError(f"pairs need num >= 1, got {num!r}")
    if int(batch_size) < 1:
        raise FewstepError(f"batch_size must be >= 1, got {batch_size!r}")
    if float(guidance) < 0:
        raise FewstepError(f"guidance must be >= 0, got {guidance!r}")
    if teacher.data_shape is None:
        raise FewstepError("the teacher does not record its data shape (denoiser.data_shape)")


def _labels(teacher, num: int, labels) -> torch.Tensor | None:
    """Sample i's condition: labels[i] when given, else i % num_classes for class-conditional teachers."""
    if labels is not None:
        labels = torch.as_tensor(labels).cpu()
        if labels.shape[0] != num:
            raise FewstepError(f"got {labels.shape[0]} labels for {num} pairs")
        return labels
    if teacher.cond_kind == "class":
        return torch.arange(num) % int(teacher.num_classes)
    if teacher.cond_kind != "none":
        raise FewstepError(f"a {teacher.cond_kind!r}-conditioned teacher needs explicit conditions (labels=...)")
    return None


@torch.no_grad()
def _make_range(teacher, start: int, count: int, *, timesteps, solver: str, seed: int, guidance: float,
                labels: torch.Tensor | None, batch_size: int, progress=None):
    """Pairs start..start+count-1, in batches of batch_size that begin at `start`."""
    dtype, device = model_dtype(teacher), model_device(teacher)
    noises, xs = [], []
    for b0 in range(start, start + count, batch_size):
        n = min(batch_size, start + count - b0)
        seeds = sample_seeds(seed, b0, n)
        z = noise_for_seeds(seeds, teacher.data_shape)  # float32 on the CPU: exactly what `generate` draws
        cond = labels[b0:b0 + n].to(device) if labels is not None else None
        x = sample(teacher, z.to(device=device, dtype=dtype), timesteps=timesteps, solver=solver, cond=cond,
                   guidance=guidance)
        noises.append(z)
        xs.append(x.to(torch.promote_types(x.dtype, torch.float32)).cpu())
        if progress is not None:
            progress(n)
    return torch.cat(noises), torch.cat(xs)


def _eval_mode(teacher):
    was = teacher.training
    teacher.eval()
    return was


def make_pairs(teacher, num: int, *, steps: int, solver: str = "heun", spacing: str = "uniform", seed: int = 0,
               guidance: float = 1.0, labels=None, batch_size: int = 1024, progress=None) -> PairSet:
    """`num` pairs (z_i, x_i = ODE_teacher(z_i)) in memory, z_i the noise `generate(teacher, ..., seed=seed)`
    starts sample i from. `progress(n)` is called after each batch with the number of pairs it made."""
    _check_args(teacher, num, steps, solver, batch_size, guidance)
    num, batch_size = int(num), int(batch_size)
    timesteps = resolve_timesteps(teacher.process, int(steps), None, spacing)
    cond = _labels(teacher, num, labels)
    was = _eval_mode(teacher)
    try:
        noise, x = _make_range(teacher, 0, num, timesteps=timesteps, solver=solver, seed=int(seed),
                               guidance=float(guidance), labels=cond, batch_size=batch_size, progress=progress)
    finally:
        teacher.train(was)
    manifest = _manifest(teacher, num=num, steps=steps, solver=solver, spacing=spacing, seed=seed, guidance=guidance,
                         labels=labels, cond=cond, shard_size=None, teacher_spec=None)
    return PairSet(noise, x, cond, manifest)


# -- on disk -----------------------------------------------------------------------------------------
def model_fingerprint(denoiser) -> str:
    """sha256 of a Denoiser's weights (names, dtypes, shapes, bytes) and its config (process, prediction...)."""
    h = hashlib.sha256(json.dumps(denoiser.config(), sort_keys=True).encode())
    for name, tensor in sorted(denoiser.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _manifest(teacher, *, num, steps, solver, spacing, seed, guidance, labels, cond, shard_size, teacher_spec):
    m = {"format": PAIRS_FORMAT, "version": PAIRS_VERSION,
         "teacher": None if teacher_spec is None else str(teacher_spec),
         "teacher_sha256": model_fingerprint(teacher),
         "process": teacher.process.config(), "prediction": teacher.prediction,
         "solver": solver, "steps": int(steps), "spacing": spacing, "seed": int(seed), "guidance": float(guidance),
         "num": int(num), "data_shape": list(teacher.data_shape), "cond_kind": teacher.cond_kind,
         "cond": None if cond is None else {"dtype": str(cond.dtype).replace("torch.", ""),
                                            "shape": list(cond.shape[1:]),
                                            "source": "given" if labels is not None else "i % num_classes"},
         "noise": "unit Gaussian from the per-sample seeds of fewstep.sampling.seeds (seed * 1000003 + i), float32"}
    if labels is not None:
        m["cond"]["sha256"] = hashlib.sha256(cond.contiguous().numpy().tobytes()).hexdigest()
    if shard_size is not None:
        m["shard_size"] = int(shard_size)
        m["num_shards"] = math.ceil(int(num) / int(shard_size))
    return m


def _identity(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in _DESCRIPTIVE}


def manifest_fingerprint(manifest: dict) -> str:
    """sha256 of what a pair set is (everything in its manifest but the teacher's display name); every shard
    records it, so shards of different sets are never mixed."""
    return hashlib.sha256(json.dumps(_identity(manifest), sort_keys=True).encode()).hexdigest()


def _read_manifest(path: Path) -> dict:
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FewstepError(f"cannot read {str(path / MANIFEST)!r}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != PAIRS_FORMAT:
        raise FewstepError(f"{str(path / MANIFEST)!r} is not a fewstep pairs manifest")
    if m.get("version", 0) > PAIRS_VERSION:
        raise FewstepError(f"{str(path)!r} holds pairs of format version {m.get('version')}; this fewstep reads up "
                           f"to {PAIRS_VERSION} (upgrade fewstep)")
    return m


def _differences(old: dict, new: dict) -> list[str]:
    a, b = _identity(old), _identity(new)
    out = [f"{k}={a.get(k)!r} (asked: {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if a.get("teacher_sha256") != b.get("teacher_sha256"):  # the weights' bytes, so their dtype too
        out.append("the teacher's weights differ: another teacher, or the same one in another --dtype (sets made "
                   "before --dtype existed are fp32)")
    return out


def _shard_metadata(fingerprint: str, index: int, start: int, count: int) -> dict[str, str]:
    # one key: safetensors writes metadata from a hash map, so several keys would come out in a random order
    # and the same shard would not always be the same bytes
    return {"fewstep_pairs": json.dumps({"fingerprint": fingerprint, "shard": index, "start": start, "count": count},
                                        sort_keys=True)}


def _shard_ok(path: Path, fingerprint: str, index: int, count: int) -> bool:
    """True when `path` is a complete shard `index` of the set with this fingerprint."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fewstep_pairs", "{}"))
            keys = set(f.keys())
            if meta.get("fingerprint") != fingerprint or meta.get("shard") != index or meta.get("count") != count:
                return False
            if not {"noise", "x"} <= keys:
                return False
            return all(f.get_slice(k).get_shape()[0] == count for k in keys)
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False


def _shard_range(manifest: dict, index: int) -> tuple[int, int]:
    start = index * manifest["shard_size"]
    return start, min(manifest["shard_size"], manifest["num"] - start)


def open_pairs(teacher, out, num: int, *, steps: int, solver: str = "heun", spacing: str = "uniform", seed: int = 0,
               guidance: float = 1.0, shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = 1024,
               teacher_spec: str | None = None, labels=None) -> dict:
    """Create the pair set directory `out` with its manifest, or check that an existing one was made with these
    arguments (one-line error otherwise); returns the manifest. `generate_pairs` starts with it; call it once
    before several workers start on one shared directory."""
    _check_args(teacher, num, steps, solver, batch_size, guidance)
    if int(shard_size) < 1:
        raise FewstepError(f"shard_size must be >= 1, got {shard_size!r}")
    cond_all = _labels(teacher, int(num), labels)
    manifest = _manifest(teacher, num=int(num), steps=steps, solver=solver, spacing=spacing, seed=seed,
                         guidance=guidance, labels=labels, cond=cond_all, shard_size=shard_size,
                         teacher_spec=teacher_spec)
    out = Path(out)
    if (out / MANIFEST).is_file():
        existing = _read_manifest(out)
        diff = _differences(existing, manifest)
        if diff:
            raise FewstepError(f"pairs in {str(out)!r} were made with other arguments: {'; '.join(diff)}; use the "
                               "same arguments to finish them or a new --out")
        manifest = existing
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FewstepError(f"--out {str(out)!r} exists and is not a pair set (no {MANIFEST}); choose a new path")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))
    return manifest


def generate_pairs(teacher, out, num: int, *, steps: int, solver: str = "heun", spacing: str = "uniform",
                   seed: int = 0, guidance: float = 1.0, shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = 1024,
                   progress=None, teacher_spec: str | None = None, labels=None, worker: int = 0,
                   workers: int = 1) -> dict:
    """Make the pair set `out` on disk (see the module docstring), or finish it: only missing shards are made.

    A directory made with other arguments (teacher weights, solver, steps, spacing, seed, guidance, num, shard
    size, labels) is refused with a one-line error. worker/workers: make only shards j with j % workers == worker
    (the others can be made elsewhere and copied in). `progress(n)` is called after each batch with the number of
    pairs made. Returns a JSON-able summary (shards made and present, pairs/s, whether the set is complete).
    """
    if int(workers) < 1 or not 0 <= int(worker) < int(workers):
        raise FewstepError(f"need 0 <= worker < workers, got worker={worker}, workers={workers}")
    manifest = open_pairs(teacher, out, num, steps=steps, solver=solver, spacing=spacing, seed=seed,
                          guidance=guidance, shard_size=shard_size, batch_size=batch_size, teacher_spec=teacher_spec,
                          labels=labels)
    out = Path(out)
    num, batch_size = int(num), int(batch_size)
    timesteps = resolve_timesteps(teacher.process, int(steps), None, spacing)
    cond_all = _labels(teacher, num, labels)
    fingerprint = manifest_fingerprint(manifest)
    mine = [j for j in range(manifest["num_shards"]) if j % int(workers) == int(worker)]
    for j in mine:  # temporary files of a killed write of one of our shards
        for tmp in out.glob(f".{shard_name(j)}.*.tmp"):
            tmp.unlink(missing_ok=True)
    todo = []
    for j in mine:
        path = out / shard_name(j)
        if path.exists() and not _shard_ok(path, fingerprint, j, _shard_range(manifest, j)[1]):
            path.unlink()  # a partial or foreign file under a shard's name: made again
        if not path.exists():
            todo.append(j)
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    made = 0
    was = _eval_mode(teacher)
    try:
        for j in todo:
            start, count = _shard_range(manifest, j)
            noise, x = _make_range(teacher, start, count, timesteps=timesteps, solver=solver, seed=int(seed),
                                   guidance=float(guidance), labels=cond_all, batch_size=batch_size, progress=progress)
            tensors = {"noise": noise.contiguous(), "x": x.contiguous()}
            if cond_all is not None:
                tensors["cond"] = cond_all[start:start + count].contiguous()
            meta = _shard_metadata(fingerprint, j, start, count)
            atomic_write(out / shard_name(j), lambda tmp, t=tensors, m=meta: save_file(t, tmp, metadata=m))
            made += count
    finally:
        teacher.train(was)
    seconds = time.perf_counter() - t0
    present = [j for j in range(manifest["num_shards"]) if (out / shard_name(j)).is_file()]
    return {"out": str(out), "num": manifest["num"], "num_shards": manifest["num_shards"],
            "shard_size": manifest["shard_size"], "worker": int(worker), "workers": int(workers),
            "shards_made": todo, "shards_present": len(present), "complete": len(present) == manifest["num_shards"],
            "pairs_made": made, "seconds": round(seconds, 3),
            "pairs_per_second": round(made / seconds, 1) if made and seconds > 0 else None,
            "solver": manifest["solver"], "steps": manifest["steps"], "seed": manifest["seed"],
            "guidance": manifest["guidance"], "teacher": manifest["teacher"]}


def pairs_complete(path) -> bool:
    """True when `path` holds a manifest and a file under every shard's name (`load_pairs` checks them)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return False
    try:
        n = int(json.loads((path / MANIFEST).read_text())["num_shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((path / shard_name(j)).is_file() for j in range(n))


def load_pairs(path) -> PairSet:
    """A complete pair set written by `generate_pairs` (safetensors only). A missing manifest or shard, or a
    shard of another set, is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FewstepError(f"{str(path)!r} is not a pair set: {MANIFEST} not found (make one with `fewstep pairs`)")
    manifest = _read_manifest(path)
    for key in ("num", "num_shards", "shard_size", "data_shape"):
        if key not in manifest:
            raise FewstepError(f"{str(path / MANIFEST)!r} lacks {key!r}")
    fingerprint = manifest_fingerprint(manifest)
    missing = [shard_name(j) for j in range(manifest["num_shards"]) if not (path / shard_name(j)).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FewstepError(f"pairs in {str(path)!r} are incomplete: {len(missing)} of {manifest['num_shards']} shards "
                           f"missing ({shown}); run the same `fewstep pairs` command again to make them")
    noises, xs, conds = [], [], []
    shape = tuple(manifest["data_shape"])
    for j in range(manifest["num_shards"]):
        f = path / shard_name(j)
        count = _shard_range(manifest, j)[1]
        if not _shard_ok(f, fingerprint, j, count):
            raise FewstepError(f"{str(f)!r} is not shard {j} of this pair set (truncated, or from another set); "
                               "delete it and run the same `fewstep pairs` command again")
        try:
            t = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise FewstepError(f"cannot read {str(f)!r}: {e}") from None
        if tuple(t["noise"].shape[1:]) != shape or tuple(t["x"].shape[1:]) != shape:
            raise FewstepError(f"{str(f)!r} holds data of shape {tuple(t['x'].shape[1:])}, the manifest {shape}")
        noises.append(t["noise"])
        xs.append(t["x"])
        conds.append(t.get("cond"))
    has_cond = manifest.get("cond") is not None
    if has_cond and any(c is None for c in conds):
        raise FewstepError(f"pairs in {str(path)!r} are conditional but a shard has no 'cond' tensor")
    return PairSet(torch.cat(noises), torch.cat(xs), torch.cat(conds) if has_cond else None, manifest)


__all__ = ["DEFAULT_SHARD_SIZE", "MANIFEST", "PairSet", "generate_pairs", "load_pairs", "make_pairs",
           "manifest_fingerprint", "model_fingerprint", "open_pairs", "pairs_complete", "shard_name"]
