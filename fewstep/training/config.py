"""The distillation run's configuration: one dataclass, one CLI flag per field, YAML recipes.

Resolution order: dataclass defaults < the method's recipe for the teacher's data kind (RECIPES)
< a YAML file (`--config`) < explicit flags. The resolved config is saved as `config.yaml` in the run.
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


@dataclass
class DistillConfig:
    method: str = "cd"
    teacher: str = "toy:checkerboard"
    out: str | None = None  # run directory (default: runs/<method>-<teacher>-<time>)
    data: str | None = None  # real data for methods that need it (default: the teacher's training data)
    iters: int | None = None  # None: the method's recipe for this kind of data
    batch_size: int | None = None
    lr: float | None = None
    lr_schedule: str = "constant"  # constant | cosine (after the warm-up)
    warmup: int = 100  # linear LR warm-up iterations
    grad_clip: float = 1.0  # max grad norm per trained network (0 = off)
    grad_accum: int = 1  # micro-batches per optimizer step
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate autocast)
    ema: str = "fixed"  # EMA of the student used for sampling: none | fixed | power
    ema_decay: float = 0.999  # fixed EMA decay
    ema_gamma: float = 6.94  # power EMA exponent (Karras et al. 2024): beta_t = (1 - 1/t)^(gamma + 1)
    guidance: float = 1.0  # teacher CFG scale (methods that guide the teacher with a fixed scale)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 50
    sample_every: int = 500  # write a sample grid every N iterations (0 = only at the end)
    checkpoint_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 2
    eval: bool = True  # final quality table (teacher vs student on the built-in metric)
    eval_num: int | None = None  # samples for the quality table (default: 4096 toys, 2000 digits)
    eval_steps: list[int] | None = None  # student step counts in the table (None: the method's, usually 1,2,4)
    stop_after: int | None = None  # stop (with a checkpoint) after this many iterations of this invocation
    options: dict = field(default_factory=dict)  # the method's own hyperparameters (`--opt KEY=VALUE`)
    # text-to-image (diffusers) teachers
    prompts: str | None = None  # prompt file (.txt one per line, .jsonl, .csv) or image-caption folder
    resolution: str | None = None  # N or HxW pixels (default: the pipeline's own)
    lora_rank: int | None = None  # LoRA rank of students and fake scores on the teacher's shared weights (0 = full)
    lora_alpha: float | None = None  # LoRA alpha (default: the rank)
    gradient_checkpointing: bool = False  # recompute activations of trained diffusers networks in the backward pass
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes' 8-bit AdamW, when installed)


# (method, data kind) -> defaults for the run and the method's options; tuned on the built-in teachers
RECIPES: dict[tuple[str, str], dict] = {
    ("cd", "2d"): {"iters": 1000, "batch_size": 256, "lr": 1e-3, "ema_decay": 0.995,
                   "options": {"num_timesteps": 40}},
    ("cd", "image"): {"iters": 1500, "batch_size": 128, "lr": 5e-4, "ema_decay": 0.999},
    ("lcm", "2d"): {"iters": 1000, "batch_size": 256, "lr": 1e-3, "ema_decay": 0.995},
    ("lcm", "image"): {"iters": 1500, "batch_size": 128, "lr": 5e-4, "ema_decay": 0.999},
    # distribution matching: DMD2 keeps its 5:1 update ratio, so the generator gets iters / 5 updates
    ("dmd2", "2d"): {"iters": 6000, "batch_size": 256, "lr": 1e-3},
    ("dmd2", "image"): {"iters": 2000, "batch_size": 128, "lr": 2e-4},
    ("dmd", "2d"): {"iters": 2000, "batch_size": 256, "lr": 3e-4},
    ("dmd", "image"): {"iters": 1500, "batch_size": 128, "lr": 1e-4},
    ("sid", "2d"): {"iters": 2000, "batch_size": 256, "lr": 3e-4},
    ("sid", "image"): {"iters": 1500, "batch_size": 128, "lr": 1e-4},
    ("reflow", "2d"): {"iters": 1000, "batch_size": 256, "lr": 1e-3, "ema_decay": 0.995,
                       "options": {"pair_num": 20000}},
    ("reflow", "image"): {"iters": 1000, "batch_size": 128, "lr": 5e-4, "ema_decay": 0.999,
                          "options": {"pair_num": 10000, "pair_steps": 32}},
    # TDM: fresh noise up to the top of the time range (interval=max) and pseudo-Huber c=0.03 (the paper's 1e-3
    # is per element on SD latents; on these small teachers it turns the update into a sign and stalls them);
    # digits trains the step counts in proportion to their steps (linear), so every (step count, step) is
    # seen equally often. 2-D: the unbiased fake-score target, the 4-step grid 9x as often as each smaller
    # count, two critic updates per generator update (3000 generator updates) and a large batch with cosine
    # decay; the 4-step checkerboard student then scores like the teacher's 50 steps (README)
    ("tdm", "2d"): {"iters": 6000, "batch_size": 2048, "lr": 1e-4, "lr_schedule": "cosine",
                    "options": {"interval": "max", "huber_c": 0.03, "fake_target": "state", "step_weights": "full:9",
                                "update_ratio": 2}},
    ("tdm", "image"): {"iters": 2000, "batch_size": 128, "lr": 5e-5,
                       "options": {"interval": "max", "huber_c": 0.03, "step_weights": "linear"}},
    # diffusers text-to-image teachers: starting points from the papers (LCM-LoRA: rank 64, lr 1e-4; the student
    # learns the teacher at a fixed CFG scale, without a guidance input, so the LoRA file is all it needs)
    ("cd", "text2image"): {"iters": 1000, "batch_size": 8, "lr": 1e-4, "ema_decay": 0.999, "lora_rank": 64},
    ("lcm", "text2image"): {"iters": 1000, "batch_size": 8, "lr": 1e-4, "ema_decay": 0.999, "lora_rank": 64,
                            "guidance": 7.5, "options": {"guidance_embed": False}},
    # sCM is unstable at CD's learning rates with these teachers (their 1000-scaled time embeddings make dF/dt large)
    ("scm", "2d"): {"iters": 4000, "batch_size": 256, "lr": 5e-5, "ema_decay": 0.995,
                    "options": {"sigma_d": 1.0, "tangent_warmup": 500}},
    ("scm", "image"): {"iters": 2000, "batch_size": 128, "lr": 5e-5, "ema_decay": 0.999,
                       "options": {"sigma_d": 0.5, "tangent_warmup": 500}},
    # rCM: sCM's settings for the consistency term; the critic learns at 20x the student's (small) lr; on these
    # small teachers the student is updated every iteration with the DMD term on its 1-step samples (at sCM's
    # budget, rCM's 5:1 ratio and 1-4 step simulation left the 1-step sample behind sCM's)
    ("rcm", "2d"): {"iters": 4000, "batch_size": 256, "lr": 5e-5, "ema_decay": 0.995,
                    "options": {"sigma_d": 1.0, "tangent_warmup": 500, "fake_lr_scale": 20.0, "update_ratio": 1,
                                "sim_steps": 1}},
    ("rcm", "image"): {"iters": 2000, "batch_size": 128, "lr": 5e-5, "ema_decay": 0.999,
                       "options": {"sigma_d": 0.5, "tangent_warmup": 500, "fake_lr_scale": 20.0, "update_ratio": 1,
                                   "sim_steps": 1}},
}
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
    recipe = dict(RECIPES.get((cfg.method, data_kind), FALLBACK))
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
