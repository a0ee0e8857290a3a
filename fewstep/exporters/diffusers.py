"""Export a diffusers-teacher student as a stock diffusers pipeline folder or as diffusers LoRA weights.

The pipeline gets a scheduler that runs the student's own fewstep sampler:

- VP students with fresh re-noise (consistency sampling: x0 = f(x_t), then alpha x0 + sigma z with new z):
  `LCMScheduler` with ``original_inference_steps=1000`` (its timesteps 999 - floor(1000 i / n) equal the
  sampler's trailing ones when n divides 1000) and the student's boundary scaling;
- VP students with deterministic re-noise (DDIM) or the Euler solver (which is DDIM): `DDIMScheduler` with
  trailing spacing, eta 0 and alpha 1 at the end (exact when n divides 1000; diffusers' trailing Euler
  scheduler would start from sigma_max instead of sqrt(1 + sigma_max^2) times the noise, 0.2% off for SD);
- flow students: `FlowMatchEulerDiscreteScheduler` with shift 1 (stochastic_sampling for fresh re-noise).
  SD3: its last sigma stretched to 1/n0 (``shift_terminal``) so that the student's n0-step grid 1, 1 - 1/n0, ...,
  1/n0 comes out at n0 steps. Flux: ``FluxPipeline`` hands the scheduler sigmas 1, 1 - 1/n, ..., 1/n, which
  are the uniform grid at every n once the dynamic (resolution-dependent) shift is off, so nothing is stretched.
  A guidance-distilled Flux student is called with ``guidance_scale`` = its default guidance (what its guidance
  embedding got in training).

Noise: the pipeline draws the initial latents and each fresh re-noise from the generators it is given,
in turn; fewstep's diffusers models use that "sequential" stream per sample, so
``generator=[torch.Generator().manual_seed(s) for s in fewstep.sampling.sample_seeds(seed, 0, n)]`` gives
`fewstep sample --seed SEED`'s images.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fewstep.errors import FewstepError
from fewstep.exporters.card import model_card
from fewstep.models.diffusers_nets import TRANSFORMER_ARCHS

CHECK_STEPS = tuple(range(1, 9))


def _require_diffusers_student(den, fmt: str):
    if not hasattr(den.net, "standalone_model") or den.components is None:
        raise FewstepError(f"--format {fmt} needs a student of a diffusers teacher; built-in students export with "
                           "--format safetensors")


def student_timesteps(den, steps: int) -> list[float]:
    """The model times the student's own sampler evaluates at `steps` steps (its saved time list, else its spacing)."""
    from fewstep.sampling import sampler_settings

    return sampler_settings(den, steps=steps).timesteps.tolist()


def _scheduler_times(sched, steps: int, flow: bool, flux: bool = False) -> list[float]:
    if flux:  # as FluxPipeline calls it (mu is ignored without dynamic shifting)
        import numpy as np

        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=0.0)
    else:
        sched.set_timesteps(steps)
    if flow:
        return [float(s) for s in sched.sigmas[:-1]]
    return [float(t) for t in sched.timesteps]


def scheduler_for(den):
    """(scheduler, info) reproducing the student's default sampler; info says which step counts match exactly."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

    from fewstep.diffusion.processes import RectifiedFlow, VPDiscrete

    meta = den.meta
    solver = meta.get("default_solver", "fewstep")
    renoise = meta.get("default_renoise", "fresh")
    n0 = int(meta.get("default_steps", 1))
    base = dict(den.components.pipe.scheduler.config)
    flux = getattr(den.net, "arch", None) == "flux"
    if isinstance(den.process, VPDiscrete):
        prediction = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[den.prediction]
        common = {k: base[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                       "trained_betas") if k in base}
        if solver == "fewstep" and renoise == "fresh":
            b = den.boundary
            # c_skip = 0, c_out = 1 in practice for students without LCM's boundary
            scaling = b["time_scale"] if b is not None else 1e6
            sched = LCMScheduler(**common, prediction_type=prediction, original_inference_steps=1000, steps_offset=1,
                                 timestep_scaling=scaling, set_alpha_to_one=True, clip_sample=False)
        elif (solver == "fewstep" and renoise == "deterministic") or solver == "euler":
            sched = DDIMScheduler(**common, prediction_type=prediction, timestep_spacing="trailing", steps_offset=1,
                                  set_alpha_to_one=True, clip_sample=False)
        else:
            raise FewstepError(f"no stock diffusers scheduler reproduces the {solver} sampler of this student; "
                               "export --format safetensors and sample with fewstep")
        flow = False
    elif isinstance(den.process, RectifiedFlow):
        if solver not in ("fewstep", "euler"):
            raise FewstepError(f"no stock diffusers scheduler reproduces the {solver} sampler of this student")
        stochastic = solver == "fewstep" and renoise == "fresh"
        terminal = 1.0 / n0 if n0 >= 2 and not flux else None
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, stochastic_sampling=stochastic,
                                                shift_terminal=terminal, use_dynamic_shifting=False)
        flow = True
    else:
        raise FewstepError(f"cannot export a student of process {den.process!r} to diffusers")
    exact = []
    for n in sorted(set(CHECK_STEPS) | {n0}):
        try:
            theirs = _scheduler_times(sched, n, flow, flux)
        except (ValueError, ZeroDivisionError):
            continue
        ours = student_timesteps(den, n)
        if len(theirs) == len(ours) and all(abs(a - b) <= 1e-5 * max(1.0, abs(b))
                                            for a, b in zip(theirs, ours, strict=True)):
            exact.append(n)
    info = {"scheduler": type(sched).__name__, "config": {k: v for k, v in dict(sched.config).items()
                                                          if not k.startswith("_")},
            "default_steps": n0, "exact_steps": exact, "timesteps": student_timesteps(den, n0)}
    return sched, info


def _new_pipeline(pipe, **replace):
    """A pipeline of the same class sharing `pipe`'s components, with some replaced."""
    comps = dict(pipe.components)
    comps.update(replace)
    params = inspect.signature(type(pipe).__init__).parameters
    kwargs = {k: v for k, v in comps.items() if k in params}
    for name in params:
        if name not in kwargs and name in pipe.config and name not in ("self",):
            kwargs[name] = pipe.config[name]
    if "add_watermarker" in params:
        kwargs["add_watermarker"] = False
    if "requires_safety_checker" in params and comps.get("safety_checker") is None:
        kwargs["requires_safety_checker"] = False
    return type(pipe)(**kwargs)


def _staged(out: Path, write) -> Path:
    """Write a directory with `write(staging)` and rename it to `out` (which must not exist or be empty)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write(staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def export_pipeline(den, out: str | Path, rows: list[dict] | None = None, run: dict | None = None) -> dict:
    """A complete diffusers pipeline folder with the student (LoRA merged) and its scheduler, plus README.md."""
    _require_diffusers_student(den, "diffusers")
    out = Path(out)
    sched, info = scheduler_for(den)
    pipe = den.components.pipe
    name = "transformer" if den.net.arch in TRANSFORMER_ARCHS else "unet"
    base_dtype = getattr(pipe, name).dtype
    model = den.net.standalone_model()
    if base_dtype in (torch.float16, torch.bfloat16):
        model.to(base_dtype)
    new = _new_pipeline(pipe, **{name: model, "scheduler": sched})
    card = model_card(den, "diffusers", out, rows, run, info)

    def write(staging: Path):
        new.save_pretrained(str(staging), safe_serialization=True)
        (staging / "README.md").write_text(card)

    _staged(out, write)
    return {"scheduler": info, "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())}


def export_lora(den, out: str | Path, rows: list[dict] | None = None, run: dict | None = None) -> dict:
    """Diffusers LoRA weights (pytorch_lora_weights.safetensors) for `pipe.load_lora_weights`, the scheduler
    config in scheduler/, and README.md."""
    _require_diffusers_student(den, "lora")
    if getattr(den.net, "role", "") != "lora":
        raise FewstepError("this student was fully fine-tuned and has no LoRA: export --format diffusers (or distill "
                           "with --lora-rank R)")
    out = Path(out)
    state = den.net.lora_state_dict()
    sched, info = scheduler_for(den)
    pipe = den.components.pipe
    # FluxPipeline's and StableDiffusion3Pipeline's LoRA loaders read "transformer"; the UNet pipelines' "unet"
    key = "transformer_lora_layers" if den.net.arch in TRANSFORMER_ARCHS else "unet_lora_layers"
    card = model_card(den, "lora", out, rows, run, info)

    def write(staging: Path):
        type(pipe).save_lora_weights(str(staging), **{key: state}, safe_serialization=True)
        sched.save_pretrained(str(staging / "scheduler"))
        (staging / "README.md").write_text(card)

    _staged(out, write)
    return {"scheduler": info, "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())}
