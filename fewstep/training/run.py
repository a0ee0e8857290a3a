"""A run: its resolved config, its directory and the rules for resuming it.

Resolution order: dataclass defaults < the method's recipe for the teacher's kind of data < a YAML file or a
dict < explicit keyword arguments (flags). A new run's directory must be new or empty; config.yaml is written
once the run is known to start. A resumed run reads its own config.yaml and may change only the fields in
RESUME_OVERRIDABLE. A run directory holds config.yaml, log.jsonl, metrics.json, samples/*.png, student/ (the
weights to sample with: the EMA when enabled), student_online/ and checkpoints/.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from fewstep.errors import FewstepError
from fewstep.fileio import atomic_write
from fewstep.methods import DistillMethod, build_method_config, get_method
from fewstep.teachers import RUN_CONFIG, RUN_STUDENT, data_kind, load_model
from fewstep.training import checkpoint as ckpt
from fewstep.training.config import DistillConfig, load_yaml, make_config, resolve, teacher_options
from fewstep.training.optim import make_optimizer

CONFIG_YAML = RUN_CONFIG
LOG = "log.jsonl"
METRICS = "metrics.json"
STUDENT = RUN_STUDENT
STUDENT_ONLINE = "student_online"
SAMPLES = "samples"
# fields that may differ when a run is resumed (they do not change what is trained)
RESUME_OVERRIDABLE = {"iters", "stop_after", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
                      "eval", "eval_num", "eval_steps", "device", "out"}


@dataclass
class RunPlan:
    """A resolved run: its config, and for a new run the teacher and method the checks built (the trainer reuses
    them instead of building them again; None when resuming)."""

    config: DistillConfig
    teacher: object = None
    method: DistillMethod | None = None


def merge_values(config=None, overrides: dict | None = None,
                 update_options: dict | None = None) -> tuple[dict, set[str]]:
    """(values, the fields set explicitly) from a YAML path, a dict or a DistillConfig, then keyword overrides
    (an `options` override replaces the config's options), then `update_options`, set on top of the options
    key by key (what `--opt KEY=VALUE` does)."""
    values: dict = {}
    if isinstance(config, (str, Path)):
        values.update(load_yaml(config))
    elif isinstance(config, DistillConfig):
        values.update(dataclasses.asdict(config))
    elif isinstance(config, dict):
        values.update(config)
    elif config is not None:
        raise FewstepError(f"config must be a YAML path, a dict or a DistillConfig, not {type(config).__name__}")
    overrides = dict(overrides or {})
    explicit = set(values) | set(overrides)
    values.update(overrides)
    if update_options:
        values["options"] = {**(values.get("options") or {}), **update_options}
        explicit.add("options")
    return values, explicit


def run_device(values: dict, resume: bool) -> str:
    """The run's --device: given, or (resuming) the one it was started with, else auto."""
    device = values.get("device")
    if device is None and resume and values.get("out"):
        saved = Path(values["out"]) / CONFIG_YAML
        device = load_yaml(saved).get("device") if saved.is_file() else None
    return device or "auto"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(text)).name if "/" in str(text) else str(text)).strip("_")


def default_run_dir(method: str, teacher: str) -> Path:
    return Path("runs") / f"{method}-{_slug(teacher)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def plan_run(values: dict, *, explicit: set[str], resume: bool = False, check_out: bool = True) -> RunPlan:
    """Resolve a config dict (defaults < recipe < YAML/flags) and check the run directory.

    New run: `out` must not exist or be empty; the teacher is loaded and the method built once, so bad options
    fail before anything is written. Resume: `out` must hold a run; its config.yaml is used, with only
    RESUME_OVERRIDABLE fields taken from `values`. `check_out`: only the main process checks `out` (the others
    may already see the directory it made).
    """
    from fewstep.outputs import ensure_new_path

    if resume:
        return RunPlan(_resumed_config(values, explicit))
    cfg = make_config(values)
    teacher = load_model(cfg.teacher, **teacher_options(cfg))
    cfg = resolve(cfg, data_kind(teacher), explicit)
    if "guidance" not in explicit and teacher.meta.get("default_guidance") is not None:
        # a teacher whose guidance scale is a network input samples at its own default (FLUX.1-dev: FluxPipeline's
        # 3.5 fed to its guidance embedding), which beats a recipe's CFG scale
        cfg = dataclasses.replace(cfg, guidance=float(teacher.meta["default_guidance"]))
    for flag, on in (("--lora-rank", cfg.lora_rank), ("--gradient-checkpointing", cfg.gradient_checkpointing)):
        if on and not hasattr(teacher.net, "derive"):
            raise FewstepError(f"{flag} needs a diffusers teacher (sd15, sdxl, sd3, flux-dev, a hub id or pipeline "
                               f"folder), "
                               f"not {cfg.teacher!r}")
    make_optimizer(cfg.optimizer, [torch.zeros(1, requires_grad=True)], lr=1.0)  # bitsandbytes missing: fail now
    method = get_method(cfg.method)(teacher, build_method_config(cfg.method, cfg.options), guidance=cfg.guidance)
    if cfg.out is None:
        cfg = dataclasses.replace(cfg, out=str(default_run_dir(cfg.method, cfg.teacher)))
    if check_out:
        ensure_new_path(cfg.out, "--out")
    return RunPlan(cfg, teacher, method)


def prepare_run(values: dict, *, explicit: set[str], resume: bool = False, check_out: bool = True) -> DistillConfig:
    """The resolved DistillConfig of `plan_run` (for callers that build their own Trainer)."""
    return plan_run(values, explicit=explicit, resume=resume, check_out=check_out).config


def _resumed_config(values: dict, explicit: set[str]) -> DistillConfig:
    out = values.get("out")
    if not out:
        raise FewstepError("--resume needs --out RUN_DIR (the run to continue)")
    path = Path(out) / CONFIG_YAML
    if not path.is_file():
        raise FewstepError(f"nothing to resume: {str(path)!r} not found")
    saved = load_yaml(path)

    def differs(k):
        if k == "options":  # given options must agree with the saved ones (which include the recipe's)
            return any((saved.get("options") or {}).get(o) != v for o, v in (values.get(k) or {}).items())
        if k == "iters" and saved.get("lr_schedule") == "cosine":
            return values.get(k) != saved.get(k)  # the cosine schedule depends on the length
        return k not in RESUME_OVERRIDABLE and values.get(k) != saved.get(k)

    changed = sorted(k for k in explicit if differs(k))
    if changed:
        raise FewstepError(f"cannot change {', '.join(changed)} when resuming (only "
                           f"{', '.join(sorted(RESUME_OVERRIDABLE - {'out'}))} may change)")
    merged = {**saved, **{k: values[k] for k in explicit if k in RESUME_OVERRIDABLE}}
    merged["out"] = str(out)
    merged["stop_after"] = values.get("stop_after") if "stop_after" in explicit else None  # per invocation
    cfg = make_config(merged)
    ckpt.remove_partial_checkpoints(out)
    return cfg


def write_config(cfg: DistillConfig) -> None:
    """config.yaml of a new run (stop_after belongs to one invocation, not to the run: a resumed run goes on to
    `iters` unless told otherwise)."""
    import yaml

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {**dataclasses.asdict(cfg), "stop_after": None}
    atomic_write(out / CONFIG_YAML, lambda tmp: Path(tmp).write_text(yaml.safe_dump(data, sort_keys=False)))


def append_log(out: str | Path, record: dict) -> None:
    """One line of the run's log.jsonl."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(out: str | Path, iteration: int) -> None:
    """Drop log lines past `iteration` (a resumed run writes them again)."""
    log = Path(out) / LOG
    if not log.is_file():
        return
    keep = []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(rec.get("iteration", 0)) <= iteration:
            keep.append(line)
    atomic_write(log, lambda tmp: Path(tmp).write_text("".join(s + "\n" for s in keep)))


def run_summary(run: str | Path, metrics: dict | None = None) -> dict:
    """What a model card reports about the run that made a student: its CFG scale, training time and the last
    logged (averaged) losses."""
    run = Path(run)
    if metrics is None:
        metrics = read_metrics(run)
    out: dict = {}
    if (run / CONFIG_YAML).is_file():
        cfg = load_yaml(run / CONFIG_YAML)
        out.update({k: cfg.get(k) for k in ("guidance", "iters", "batch_size", "lr", "lora_rank", "resolution")})
    if metrics.get("train_seconds") is not None:
        out["train_seconds"] = metrics["train_seconds"]
    if (run / LOG).is_file():
        for line in reversed((run / LOG).read_text().splitlines()):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "losses_avg" in rec:
                out["losses"] = rec["losses_avg"]
                break
    return out


def read_metrics(run: str | Path) -> dict:
    """A run's metrics.json ({} when it has none, e.g. a model directory)."""
    path = Path(run) / METRICS
    return json.loads(path.read_text()) if path.is_file() else {}
