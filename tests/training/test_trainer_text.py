"""The trainer on text-to-image (diffusers) teachers: prompt conditions and real latents as data, LoRA and full
students, a DMD-style method with a LoRA fake score and a GAN head on its bottleneck, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fewstep.errors import FewstepError
from fewstep.methods import DistillMethod, Phase, Role
from fewstep.models.gan import capture_features, feature_layer
from fewstep.teachers.random_pipelines import save_caption_folder, save_random_pipeline
from fewstep.training import distill
from fewstep.training.optim import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(batch_size=2, eval=False, sample_every=0, warmup=1, log_every=1, checkpoint_every=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\na dog\nthe red thing\n")
    return {"sdxl": save_random_pipeline("sdxl", root / "sdxl"), "data": save_caption_folder(root / "caps"),
            "prompts": prompts}


class GanHeadOnFakeScore(DistillMethod):
    """A DMD2-shaped test method: a LoRA fake score learns the student's samples (denoising loss), a small head
    reads the fake score's bottleneck, and the student follows the teacher minus the fake score."""

    needs_data = False

    def networks(self):
        student = self.student_from_teacher()
        fake = self.student_from_teacher()
        head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(1))
        with torch.no_grad(), capture_features(feature_layer(fake)) as feats:  # materialise the lazy head
            x = torch.zeros(1, *self.teacher.data_shape)
            fake(x, torch.tensor([500.0]), self.teacher.null_condition(1))
        head(feats["features"])
        return {"teacher": Role(self.teacher), "student": Role(student, trainable=True, betas=(0.0, 0.99)),
                "fake_score": Role(fake, trainable=True, lr_scale=5.0), "discriminator": Role(head, trainable=True)}

    def phases(self):
        return [Phase("critic", ("fake_score", "discriminator")), Phase("generator", ("student",))]

    def loss(self, phase, batch, nets, ctx):
        shape = (batch.size, *self.teacher.data_shape)
        z = ctx.randn(shape)
        t_max = torch.full((batch.size,), 999.0, device=ctx.device)
        x = nets["student"](z, t_max, batch.cond)
        t = (20 + 960 * ctx.rand(batch.size)).float().to(ctx.device)
        eps = ctx.randn(shape)
        if phase == "critic":
            x = x.detach()
            xt = self.teacher.process.add_noise(x, eps, t)
            with capture_features(feature_layer(nets["fake_score"])) as feats:
                pred = nets["fake_score"](xt, t, batch.cond)
            logits = nets["discriminator"](feats["features"])
            gan = torch.nn.functional.softplus(logits).mean()
            return {"loss": (pred - x).square().mean() + 0.01 * gan, "gan": gan.detach()}
        xt = self.teacher.process.add_noise(x, eps, t)
        with torch.no_grad():
            real = nets["teacher"](xt, t, batch.cond, 2.0)
            fake = nets["fake_score"](xt, t, batch.cond)
            grad = (fake - real) / (x - real).abs().mean().clamp_min(1e-6)
        return {"loss": 0.5 * (x - (x - grad).detach()).square().mean()}


def test_lora_fake_score_and_gan_head_on_prompts_resume_bit_exact(tiny, tmp_path, register):
    register("gan_on_fake", GanHeadOnFakeScore)
    kw = dict(method="gan_on_fake", teacher=str(tiny["sdxl"]), prompts=str(tiny["prompts"]), lora_rank=2,
              ema="power", **FAST)
    full, split = tmp_path / "full", tmp_path / "split"
    distill(out=str(full), iters=4, **kw)
    res = distill(out=str(split), iters=4, stop_after=2, **kw)
    assert not res["finished"]
    distill(out=str(split), resume=True)
    a = load_file(str(full / "student" / "model.safetensors"))
    b = load_file(str(split / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(k.startswith("lora.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ckpt = load_file(str(next((full / "checkpoints").iterdir()) / "state.safetensors"))
    nets = {k.split(".")[1] for k in ckpt if k.startswith("net.")}
    assert nets == {"student", "fake_score", "discriminator"}
    # checkpoints hold adapters only: far smaller than the UNet they ride on
    unet_params = sum(v.numel() for v in load_file(str(next((tiny["sdxl"] / "unet").glob("*.safetensors")))).values())
    assert sum(v.numel() for k, v in ckpt.items() if k.startswith("net.fake_score.")) < 0.2 * unet_params
    log = [json.loads(x) for x in (full / "log.jsonl").read_text().splitlines()]
    assert all("critic/gan" in r["losses"] and "generator/loss" in r["losses"] for r in log)
    assert sorted(p.name.split("-")[0] for p in (full / "cache").iterdir()) == ["text"]  # prompts only, no latents
    # the student moved away from the teacher: its adapter is not zero any more
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if ".B." in k)


def test_cd_on_image_caption_pairs_with_full_student_and_checkpointing(tiny, tmp_path):
    run = tmp_path / "run"
    res = distill(method="cd", teacher=str(tiny["sdxl"]), data=str(tiny["data"]), out=str(run), iters=2,
                  lora_rank=0, gradient_checkpointing=True, **{**FAST, "eval": True, "sample_every": 1})
    assert res["finished"] and "table" in res and res["table"] == []  # no built-in metric for text-to-image
    assert (run / "samples" / "step_00000001.png").is_file() and (run / "samples" / "final_1step.png").is_file()
    from PIL import Image

    with Image.open(run / "samples" / "final_1step.png") as im:  # 16 decoded 16x16 RGB images, 8 per row
        assert im.mode == "RGB" and im.size[0] > im.size[1] > 100
    cfg = json.loads((run / "student" / "config.json").read_text())
    assert cfg["network"]["student"] == "full" and cfg["meta"]["resolution"] == [16, 16]
    assert sorted(p.name.split("-")[0] for p in (run / "cache").iterdir()) == ["latents", "text"]


def test_runs_that_cannot_start_write_nothing(tiny, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(FewstepError, match="--lora-rank needs a diffusers teacher"):
        distill(method="cd", teacher="toy:checkerboard", out=str(out), iters=1, lora_rank=4, **FAST)
    with pytest.raises(FewstepError, match="--gradient-checkpointing needs a diffusers teacher"):
        distill(method="cd", teacher="toy:checkerboard", out=str(out), iters=1, gradient_checkpointing=True, **FAST)
    with pytest.raises(FewstepError, match="trains on real images"):
        distill(method="cd", teacher=str(tiny["sdxl"]), prompts=str(tiny["prompts"]), out=str(out), iters=1, **FAST)
    with pytest.raises(FewstepError, match="multiple of 4"):
        distill(method="cd", teacher=str(tiny["sdxl"]), data=str(tiny["data"]), out=str(out), resolution="18",
                iters=1, **FAST)
    with pytest.raises(FewstepError, match="--lora-rank must be an integer >= 0"):
        distill(method="cd", teacher=str(tiny["sdxl"]), out=str(out), lora_rank=-1, **FAST)
    assert not out.exists()


def test_eight_bit_adam_only_with_bitsandbytes(tiny, tmp_path):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(FewstepError, match="needs bitsandbytes, which is not installed"):
            distill(method="cd", teacher=str(tiny["sdxl"]), data=str(tiny["data"]), out=str(tmp_path / "r"), iters=1,
                    optimizer="adamw8bit", **FAST)
        assert not (tmp_path / "r").exists()
    else:
        p = torch.nn.Parameter(torch.ones(4096))
        opt = make_optimizer("adamw8bit", [p], lr=0.1)
        p.grad = torch.ones_like(p)
        opt.step()
        assert float(p.max()) < 1.0
    with pytest.raises(FewstepError, match="unknown --optimizer"):
        distill(method="cd", teacher="toy:checkerboard", out=str(tmp_path / "s"), optimizer="sgd", **FAST)


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank,lr", [(8, 1e-3), (0, 3e-4)])
def test_cd_student_learns_the_teachers_ode_in_one_step(tiny, tmp_path, lora_rank, lr):
    """Quality on the tiny random SDXL: consistency distillation (LoRA and full) brings the student's 1-step sample
    closer to the teacher's 32-step Heun ODE solution from the same noise than the teacher's own 1 step.
    Measured (relative MSE to the ODE solution): teacher 1 step 0.0184; LoRA r8 0.0053; full 0.0024 (300 its)."""
    import fewstep
    from fewstep.sampling import generate
    from fewstep.teachers import load_teacher
    from fewstep.teachers.random_pipelines import CAPTIONS

    data = save_caption_folder(tmp_path / "caps", captions=CAPTIONS * 4, size=(16, 16))
    teacher = load_teacher(str(tiny["sdxl"]))
    cond = teacher.components.encode_prompts(list(CAPTIONS))
    ref, _ = generate(teacher, len(CAPTIONS), steps=32, solver="heun", spacing="trailing", seed=11, cond=cond)
    one, _ = generate(teacher, len(CAPTIONS), steps=1, solver="euler", spacing="trailing", seed=11, cond=cond)

    def rel_mse(x):
        return float((x - ref).pow(2).mean() / ref.pow(2).mean())

    distill(method="cd", teacher=str(tiny["sdxl"]), data=str(data), out=str(tmp_path / "run"), iters=300,
            lr=lr, lora_rank=lora_rank, ema="none", **{**FAST, "batch_size": 8, "warmup": 10, "log_every": 50})
    student = fewstep.load_model(tmp_path / "run")
    x, _ = generate(student, len(CAPTIONS), steps=1, solver="fewstep", spacing="trailing", seed=11, cond=cond)
    assert rel_mse(x) < 0.5 * rel_mse(one), (rel_mse(x), rel_mse(one))


@pytest.mark.slow
def test_two_process_ddp_lora_run_on_a_text_teacher(tiny, tmp_path):
    """accelerate launch with 2 CPU processes: rank 0 fills the prompt/latent caches, both ranks train the LoRA
    adapter (the only DDP parameters), rank 0 writes the run; the student loads and samples."""
    import os
    import subprocess
    import sys

    import fewstep

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fewstep.cli", "distill",
           "--method", "cd", "--teacher", str(tiny["sdxl"]), "--data", str(tiny["data"]), "--lora-rank", "4",
           "--iters", "3", "--batch-size", "2", "--sample-every", "0", "--no-eval", "--eval-steps", "1",
           "--out", str(run), "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["iterations"] == 3
    assert len(list((run / "cache").iterdir())) == 2
    student = fewstep.load_model(run)
    assert student.net.role == "lora"
    res = fewstep.sample(str(run), num=2, prompt="a cat")
    assert res["_samples"].shape == (2, 3, 16, 16) and torch.isfinite(res["_samples"]).all()
