"""End to end on a tiny SDXL-architecture pipeline built from configs (and tiny SD3 and Flux ones): distill a few
iterations, export a diffusers pipeline folder and LoRA weights, reload them with stock diffusers and
compare images with `fewstep sample` on the same seeds.

"Matches" means: the same prompts, steps, guidance and per-image generators
(`torch.Generator().manual_seed(s)` for s in `sample_seeds(seed, 0, n)`) give decoded images in [0, 1]
within 1e-5 of each other (float32 on the CPU; measured differences are about 4e-7).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import fewstep
from fewstep.errors import FewstepError
from fewstep.sampling import sample_seeds
from fewstep.teachers.random_pipelines import save_caption_folder, save_random_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a cat on a mat", "two yellow dots", "a red square"]
FAST = dict(iters=3, batch_size=2, sample_every=0, checkpoint_every=0, eval_steps=[1], log_every=1, warmup=1)

# (method, student, options): each line is one end-to-end case; "lora" is rank 4 on the shared teacher weights.
# TDM and DMD2 (fewstep/methods/tdm.py, dmd.py) join as one line each, e.g. ("tdm", "lora", {}), ("dmd2", "full", {}).
CASES = [
    ("cd", "lora", {}),
    ("cd", "full", {}),
    ("lcm", "full", {"guidance_embed": True}),  # LCM with the guidance-scale input (time_cond_proj_dim)
    ("lcm", "lora", {"guidance_embed": False}),  # LCM-LoRA: fixed CFG scale, no guidance input
    ("dmd2", "lora", {"steps": 4, "gan": True}),  # 4-step DMD2, GAN head on the LoRA fake score, real latents
    ("dmd2", "full", {"steps": 4}),  # 4-step DMD2 on the full UNet, no GAN
    ("tdm", "lora", {}),  # deterministic 4-step student: DDIM (trailing)
    ("tdm", "full", {}),
]
# scheduler and step counts it must reproduce exactly (TDM saves its 1-4 step grids: 999 | 999, 499 | ...)
SCHEDULERS = {"tdm": ("DDIMScheduler", [1, 2, 3, 4])}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"sdxl": save_random_pipeline("sdxl", root / "sdxl"), "sd3": save_random_pipeline("sd3", root / "sd3"),
            "sd2-v": save_random_pipeline("sd2-v", root / "sd2-v"), "flux": save_random_pipeline("flux", root / "flux"),
            "data": save_caption_folder(root / "captions"), "root": root}


def _distill(tiny, arch, method, student, options, guidance=2.0):
    out = tiny["root"] / f"run-{arch}-{method}-{student}-{len(options)}"
    kw = {} if guidance is None else {"guidance": guidance}  # None: the teacher's default
    res = fewstep.distill(method=method, teacher=str(tiny[arch]), data=str(tiny["data"]), out=str(out),
                          lora_rank=4 if student == "lora" else 0, options=options, **kw, **FAST)
    assert res["finished"] and res["iterations"] == 3
    return out


def _stock_images(pipe, prompts, steps, guidance, seed, **kw):
    gens = [torch.Generator().manual_seed(s) for s in sample_seeds(seed, 0, len(prompts))]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt",
                **kw).images


def _fewstep_images(run, prompts, steps, seed):
    res = fewstep.sample(str(run), num=len(prompts), steps=steps, seed=seed, prompts=prompts)
    return ((res["_samples"] + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("method,student,options", CASES, ids=[f"{m}-{s}" for m, s, _ in CASES])
def test_exported_pipeline_matches_fewstep_sample(tiny, method, student, options):
    from diffusers import DiffusionPipeline

    run = _distill(tiny, "sdxl", method, student, options)
    cfg = json.loads((run / "student" / "config.json").read_text())
    assert cfg["network"]["type"] == "diffusers" and cfg["network"]["student"] == student
    # the student's weights file holds the adapter only (LoRA) or the whole UNet (full)
    from safetensors.torch import load_file

    keys = list(load_file(str(run / "student" / "model.safetensors")))
    assert all(k.startswith(("lora.", "extra.")) for k in keys) if student == "lora" else all(
        k.startswith("model.") for k in keys)

    out = tiny["root"] / f"export-{run.name}"
    res = fewstep.export(run, out, format="diffusers")
    scheduler, exact = SCHEDULERS.get(method, ("LCMScheduler", [1, 2, 4, 5, 8]))
    assert res["scheduler"] == scheduler and set(exact) <= set(res["exact_steps"])
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
            "README.md"} <= {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    card = (out / "README.md").read_text()
    assert f"`{method}`" in card and scheduler in card and "guidance scale" in card
    phase = "student" if method in ("cd", "lcm") else "generator"
    assert "teacher at CFG scale 2" in card and f"{phase}/loss" in card and "## Metrics" in card

    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and type(pipe.scheduler).__name__ == scheduler
    student_meta = fewstep.load_model(run).meta
    g = float(student_meta.get("default_guidance", 1.0))
    embedded = options.get("guidance_embed", False)
    assert (pipe.unet.config.time_cond_proj_dim == 256) == embedded
    for steps in (1, 2, 4):
        ours = _fewstep_images(run, PROMPTS, steps, seed=7)
        theirs = _stock_images(pipe, PROMPTS, steps, g, seed=7)
        assert ours.shape == theirs.shape == (3, 3, 16, 16)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # multi-step samples differ from one-step ones (more steps really run) and images are not constant
    assert float((ours - _fewstep_images(run, PROMPTS, 1, seed=7)).abs().max()) > 1e-3 and float(ours.std()) > 0.01

    if student == "lora" and not embedded:
        lora_dir = tiny["root"] / f"lora-{run.name}"
        res = fewstep.export(run, lora_dir, format="lora")
        assert (lora_dir / "pytorch_lora_weights.safetensors").is_file() and (lora_dir / "README.md").is_file()
        import diffusers

        base = DiffusionPipeline.from_pretrained(str(tiny["sdxl"]))
        base.set_progress_bar_config(disable=True)
        base.load_lora_weights(str(lora_dir))
        base.scheduler = getattr(diffusers, scheduler).from_pretrained(str(lora_dir), subfolder="scheduler")
        with_lora = _stock_images(base, PROMPTS, 2, g, seed=7)
        torch.testing.assert_close(with_lora, _fewstep_images(run, PROMPTS, 2, seed=7), rtol=0, atol=1e-5)
    elif student == "lora":
        with pytest.raises(FewstepError, match="guidance-scale input"):
            fewstep.export(run, tiny["root"] / f"lora-{run.name}", format="lora")
    else:
        with pytest.raises(FewstepError, match="fully fine-tuned"):
            fewstep.export(run, tiny["root"] / f"lora-{run.name}", format="lora")


def test_flow_transformer_teacher_exports_with_flow_match_scheduler(tiny):
    """SD3 (MMDiT, rectified flow): a LoRA CD student samples with stochastic FlowMatchEuler in the stock pipeline."""
    from diffusers import DiffusionPipeline

    run = _distill(tiny, "sd3", "cd", "lora", {})
    out = tiny["root"] / "export-sd3"
    res = fewstep.export(run, out, format="diffusers")
    assert res["scheduler"] == "FlowMatchEulerDiscreteScheduler" and 1 in res["exact_steps"]
    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.stochastic_sampling and pipe.scheduler.config.shift == 1.0
    theirs = _stock_images(pipe, PROMPTS[:2], 1, 1.0, seed=3)  # a CD student samples without CFG
    torch.testing.assert_close(_fewstep_images(run, PROMPTS[:2], 1, seed=3), theirs, rtol=0, atol=1e-5)
    lora_dir = tiny["root"] / "lora-sd3"
    fewstep.export(run, lora_dir, format="lora")
    base = DiffusionPipeline.from_pretrained(str(tiny["sd3"]))
    base.set_progress_bar_config(disable=True)
    base.load_lora_weights(str(lora_dir))
    base.scheduler = type(pipe.scheduler).from_pretrained(str(lora_dir), subfolder="scheduler")
    torch.testing.assert_close(_stock_images(base, PROMPTS[:2], 1, 1.0, seed=3), theirs, rtol=0, atol=1e-5)


FLUX_CASES = [
    ("cd", "lora", {}),  # stochastic FlowMatchEuler: one step
    ("tdm", "full", {}),  # deterministic 4-step student: plain FlowMatchEuler, exact at 1, 2, 4 steps
    ("lcm", "lora", {"guidance_embed": True}),  # LCM's guidance range fed to Flux's own guidance embedding
]


@pytest.mark.parametrize("method,student,options", FLUX_CASES, ids=[f"{m}-{s}" for m, s, _ in FLUX_CASES])
def test_flux_students_export_to_flux_pipelines(tiny, method, student, options):
    """Flux (guidance-distilled, packed latents): the run's guidance defaults to FluxPipeline's 3.5 and goes to the
    teacher's guidance embedding; the exported FluxPipeline (and the LoRA file on the base FluxPipeline) called with
    the student's own guidance_scale gives fewstep's images."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    run = _distill(tiny, "flux", method, student, options, guidance=None)
    assert yaml.safe_load((run / "config.yaml").read_text())["guidance"] == 3.5
    student_den = fewstep.load_model(run)
    assert student_den.guidance_embedded and student_den.net.arch == "flux"
    # a student samples with what it was fed in training: LCM's w clamped to its range, else 1 (not the teacher's 3.5)
    g = float(student_den.meta.get("default_guidance", 1.0))
    assert g == (3.0 if options.get("guidance_embed") else 1.0)
    out = tiny["root"] / f"export-{run.name}"
    res = fewstep.export(run, out, format="diffusers")
    assert res["scheduler"] == "FlowMatchEulerDiscreteScheduler" and set(range(1, 9)) <= set(res["exact_steps"])
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert "transformer/diffusion_pytorch_model.safetensors" in files
    card = (out / "README.md").read_text()
    assert "Flux's guidance embedding" in card and "teacher at guidance scale (Flux's guidance embedding) 3.5" in card
    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "FluxPipeline" and not pipe.scheduler.config.use_dynamic_shifting
    teacher = DiffusionPipeline.from_pretrained(str(tiny["flux"])).transformer.state_dict()
    assert any(not torch.equal(v, teacher[k]) for k, v in pipe.transformer.state_dict().items())  # trained
    steps = (1, 2, 4) if method == "tdm" else (1,)  # stochastic re-noise: FluxPipeline gives the scheduler no generator
    for n in steps:
        ours = _fewstep_images(run, PROMPTS, n, seed=7)
        theirs = _stock_images(pipe, PROMPTS, n, g, seed=7, height=16, width=16)
        assert ours.shape == theirs.shape == (3, 3, 16, 16)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert float(ours.std()) > 0.01
    if student == "lora":
        lora_dir = tiny["root"] / f"lora-{run.name}"
        fewstep.export(run, lora_dir, format="lora")
        keys = list(load_file(str(lora_dir / "pytorch_lora_weights.safetensors")))
        assert any(k.startswith("transformer.single_transformer_blocks.") for k in keys)
        base = DiffusionPipeline.from_pretrained(str(tiny["flux"]))
        base.set_progress_bar_config(disable=True)
        base.load_lora_weights(str(lora_dir))
        base.scheduler = type(pipe.scheduler).from_pretrained(str(lora_dir), subfolder="scheduler")
        torch.testing.assert_close(_stock_images(base, PROMPTS, 1, g, seed=7, height=16, width=16),
                                   _fewstep_images(run, PROMPTS, 1, seed=7), rtol=0, atol=1e-5)


def test_v_prediction_and_deterministic_students(tiny):
    """An SD2-style v-prediction student exports with LCMScheduler(v_prediction); the same student sampled with
    deterministic re-noise (DDIM, as TDM samples) exports with DDIMScheduler(trailing) and still matches."""
    from diffusers import DiffusionPipeline

    from fewstep.models.io import save_denoiser

    run = _distill(tiny, "sd2-v", "cd", "full", {})
    student = fewstep.load_model(run)
    assert student.prediction == "v"
    student.meta.update(default_renoise="deterministic", default_steps=4)
    ddim_dir = tiny["root"] / "sd2-v-ddim-student"
    save_denoiser(student, ddim_dir)
    for model, name, steps in ((run, "LCMScheduler", (1, 2)), (ddim_dir, "DDIMScheduler", (1, 2, 4))):
        out = tiny["root"] / f"export-{name}"
        res = fewstep.export(model, out, format="diffusers")
        assert res["scheduler"] == name and set(steps) <= set(res["exact_steps"])
        pipe = DiffusionPipeline.from_pretrained(str(out))
        pipe.set_progress_bar_config(disable=True)
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        for n in steps:
            torch.testing.assert_close(_fewstep_images(model, PROMPTS, n, seed=1),
                                       _stock_images(pipe, PROMPTS, n, 1.0, seed=1), rtol=0, atol=1e-5)


def test_builtin_students_still_export_as_safetensors_only(tmp_path):
    run = tmp_path / "run"
    fewstep.distill(method="cd", teacher="toy:checkerboard", out=str(run), iters=2, batch_size=16, eval=False,
                    sample_every=0, warmup=1)
    res = fewstep.export(run, tmp_path / "st", format="safetensors")
    assert (tmp_path / "st" / "model.safetensors").is_file() and res["format"] == "safetensors"
    for fmt in ("diffusers", "lora"):
        with pytest.raises(FewstepError, match="needs a student of a diffusers teacher"):
            fewstep.export(run, tmp_path / fmt, format=fmt)
        assert not (tmp_path / fmt).exists()
    with pytest.raises(FewstepError, match="allowed: safetensors, diffusers, lora"):
        fewstep.export(run, tmp_path / "x", format="onnx")
