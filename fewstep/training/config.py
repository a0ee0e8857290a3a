"""The distillation run's configuration: one dataclass, one CLI flag per field, YAML recipes.

Resolution order: dataclass defaults < the method's recipe for the teacher's data kind (the method class'
`recipes`) < a YAML file (`--config`) < explicit flags. The resolved config is saved as `config.yaml` in the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from fewstep.errors import FewstepError, check_choice

EMA_TYPES = ("none", "fixed", "power")
PRECISIONS = ("no", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "adamw8bit")


def _field(default=None, help: str = "", *, factory=None, cli: str | None = None):
    """A DistillConfig field with its `fewstep distill` flag's help, where "{default}" stands for the field's
    default (`fewstep.commands.common.format_default`). `cli`: how the flag differs from the field: "path" (a
    path on the command line), "int_list" (comma-separated integers), "none" (no flag of its own)."""
    meta = {"help": help, **({"cli": cli} if cli else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DistillConfig:
    """A distillation run. Each field is one `fewstep distill` flag (generated from the field: its type, default
    and help) and one key of config.yaml; a field left to None takes the method's recipe."""

    method: str = _field("cd", "Distillation method (see `fewstep methods`; default {default}).")
    teacher: str = _field("toy:checkerboard", "Teacher: built-in name, model directory or run directory "
                                              "(default {default}).")
    out: str | None = _field(None, "New run directory (default runs/METHOD-TEACHER-TIME); with --resume, the run.",
                             cli="path")
    data: str | None = _field(None, "Real data for methods that need it (default: the teacher's training data).")
    iters: int | None = _field(None, "Training iterations (default: the method's recipe).")
    batch_size: int | None = _field(None, "Batch size per process (default: the recipe).")
    lr: float | None = _field(None, "Learning rate (default: the recipe).")
    lr_schedule: str = _field("constant", "constant | cosine, after the warm-up (default: the recipe, else constant).")
    warmup: int = _field(100, "Linear LR warm-up iterations (default {default}).")
    grad_clip: float = _field(1.0, "Max gradient norm per network, 0 = off (default {default}).")
    grad_accum: int = _field(1, "Micro-batches per optimizer step (default {default}).")
    mixed_precision: str = _field("no", "no | bf16 | fp16 (default {default}).")  # accelerate autocast
    ema: str = _field("fixed", "Student EMA for sampling: none | fixed | power (default {default}).")
    ema_decay: float = _field(0.999, "Fixed EMA decay (default: the recipe).")
    # power EMA (Karras et al. 2024): beta_t = (1 - 1/t)^(gamma + 1)
    ema_gamma: float = _field(6.94, "Power EMA exponent (default {default}).")
    guidance: float = _field(1.0, "Teacher CFG scale for conditional teachers (default {default}; a teacher whose "
                             "guidance is a network input, FLUX.1-dev, is fed it instead, 3.5 by default).")
    seed: int = _field(0, "Seed (default {default}).")
    device: str = _field("auto", "auto | cpu | cuda (default {default}).")
    log_every: int = _field(50, "Write a log.jsonl line every N iterations (default {default}).")
    sample_every: int = _field(500, "Write a sample grid every N iterations, 0 = at the end (default {default}).")
    checkpoint_every: int = _field(500, "Checkpoint every N iterations, 0 = at the end (default {default}).")
    keep_checkpoints: int = _field(2, "Checkpoints kept (default {default}).")
    eval: bool = _field(True, "Final quality table (default {default}).")  # teacher vs student on the built-in metric
    eval_num: int | None = _field(None, "Samples per quality-table entry (default 4096 toys, 2000 digits).")
    eval_steps: list[int] | None = _field(None, "Student step counts in the table, comma-separated (default: the "
                                                "method's, 1,2,4 for most; 1 for one-step generators).",
                                          cli="int_list")
    stop_after: int | None = _field(None, "Stop after N iterations of this invocation (resume later).")
    # the method's own hyperparameters: `--opt KEY=VALUE` (and a method's own flags, e.g. sCM's --mode)
    options: dict = _field(help="A method option KEY=VALUE (repeatable; see `fewstep methods`).", factory=dict,
                           cli="none")
    # text-to-image (diffusers) teachers
    prompts: str | None = _field(None, "Text-to-image teachers: prompt file (.txt one per line, .jsonl, .csv) or "
                                       "image-caption folder; conditions are cached in RUN/cache.")
    resolution: str | None = _field(None, "Diffusers teachers: N or HxW pixels (default: the pipeline's own).")
    lora_rank: int | None = _field(None, "Diffusers teachers: LoRA rank of the student and fake scores on the "
                                         "teacher's shared weights; 0 = full fine-tuning (default: the recipe).")
    lora_alpha: float | None = _field(None, "LoRA alpha (default: the rank).")
    gradient_checkpointing: bool = _field(False, "Recompute activations of trained diffusers networks in the backward "
                                                 "pass (less memory; default {default}).")
    optimizer: str = _field("adamw", "adamw | adamw8bit (bitsandbytes, if installed) (default {default}).")


# the run's defaults for a method without a recipe for this kind of data (recipes live on the method classes)
FALLBACK = {"iters": 1000, "batch_size": 64, "lr": 1e-4}


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(DistillConfig)}


def yaml_load(text: str):
    """yaml.safe_load, except that numbers in exponent form without a dot (1e-3, 5E4) are floats: YAML 1.1,
    which PyYAML follows, reads them as strings, so `lr: 1e-3` or `--opt huber_c=1e-3` would arrive as text."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"--config {str(path)!r} not found")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise FewstepError(f"cannot parse {str(path)!r}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise FewstepError(f"{str(path)!r} must hold a mapping of config fields")
    return data


def make_config(values: dict) -> DistillConfig:
    """A DistillConfig from a dict; unknown keys are a one-line error naming the allowed ones."""
    known = config_fields()
    bad = sorted(set(values) - set(known))
    if bad:
        raise FewstepError(f"unknown config field(s) {', '.join(bad)}; allowed: {', '.join(known)}")
    cfg = DistillConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: DistillConfig) -> None:
    def need(cond, msg):
        if not cond:
            raise FewstepError(msg)

    for name in ("iters", "batch_size", "grad_accum", "eval_num"):
        v = getattr(cfg, name)
        need(v is None or (isinstance(v, int) and v >= 1), f"--{name.replace('_', '-')} must be an integer >= 1, "
                                                           f"got {v!r}")
    need(cfg.lr is None or cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    check_choice("--ema", cfg.ema, EMA_TYPES)
    need(0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    check_choice("--mixed-precision", cfg.mixed_precision, PRECISIONS)
    check_choice("--device", cfg.device, DEVICES)
    check_choice("--lr-schedule", cfg.lr_schedule, LR_SCHEDULES)
    for name in ("warmup", "log_every", "sample_every", "checkpoint_every"):
        need(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    need(cfg.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    need(cfg.grad_clip >= 0, f"--grad-clip must be >= 0, got {cfg.grad_clip}")
    need(cfg.guidance >= 0, f"--guidance must be >= 0, got {cfg.guidance}")
    need(cfg.stop_after is None or cfg.stop_after >= 1, f"--stop-after must be >= 1, got {cfg.stop_after}")
    need(cfg.eval_steps is None or (len(cfg.eval_steps) > 0 and all(isinstance(s, int) and s >= 1
                                                                    for s in cfg.eval_steps)),
         f"--eval-steps must be integers >= 1, got {cfg.eval_steps}")
    need(isinstance(cfg.options, dict), "options must be a mapping of the method's hyperparameters")
    need(cfg.lora_rank is None or (isinstance(cfg.lora_rank, int) and cfg.lora_rank >= 0),
         f"--lora-rank must be an integer >= 0 (0 = full fine-tuning), got {cfg.lora_rank!r}")
    need(cfg.lora_alpha is None or cfg.lora_alpha > 0, f"--lora-alpha must be > 0, got {cfg.lora_alpha}")
    check_choice("--optimizer", cfg.optimizer, OPTIMIZERS)
    if cfg.resolution is not None:
        from fewstep.models.diffusers_pipeline import parse_resolution

        parse_resolution(cfg.resolution)


def resolve(cfg: DistillConfig, data_kind: str, explicit: set[str]) -> DistillConfig:
    """Fill the fields left to the recipe (iters, batch size, lr, ema decay...) for this method and data kind.

    `explicit`: the fields the user set (YAML or flags); the recipe never overrides those.
    """
    from fewstep.methods import get_method

    recipe = dict(get_method(cfg.method).recipes.get(data_kind, FALLBACK))
    values = dataclasses.asdict(cfg)
    for key, value in recipe.items():
        if key == "options":
            values["options"] = {**value, **values["options"]}
        elif key not in explicit:
            values[key] = value
    out = DistillConfig(**values)
    validate(out)
    return out


def parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE parsed as YAML (so 20 -> int, 1e-3 -> float, true -> bool, [1,2] -> list)."""
    import yaml

    if "=" not in text:
        raise FewstepError(f"--opt needs KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        value = yaml_load(raw)
    except yaml.YAMLError:
        value = raw
    return key, value


def teacher_options(cfg: DistillConfig) -> dict:
    """Options for loading the teacher (diffusers teachers: the run's resolution)."""
    return {"resolution": cfg.resolution} if cfg.resolution is not None else {}


def student_options(cfg: DistillConfig) -> dict:
    """How methods derive students and fake scores from a diffusers teacher (`DistillMethod.student_options`)."""
    out = {}
    if cfg.lora_rank:
        out["lora_rank"] = int(cfg.lora_rank)
        if cfg.lora_alpha:
            out["lora_alpha"] = float(cfg.lora_alpha)
    if cfg.gradient_checkpointing:
        out["gradient_checkpointing"] = True
    return out
