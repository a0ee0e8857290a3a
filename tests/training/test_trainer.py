"""The trainer: run directory, exact resume, atomic checkpoints, NaN guard, update ratios, EMA, config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from support import free_port

from fewstep.errors import FewstepError
from fewstep.methods import DistillMethod, Phase, Role
from fewstep.training import checkpoint as ckpt
from fewstep.training import distill
from fewstep.training.ema import ema_decay_at
from fewstep.training.trainer import TrainingDiverged

FAST = dict(method="cd", teacher="toy:checkerboard", batch_size=32, eval=False, sample_every=0, warmup=2,
            log_every=1)


def weights(run: Path, sub: str = "student") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / sub / "model.safetensors"))


def test_run_directory_is_self_describing(tmp_path):
    run = tmp_path / "run"
    res = distill(out=str(run), iters=6, checkpoint_every=3, eval_num=256, eval_steps=[1, 2],
                  **{**FAST, "eval": True, "sample_every": 3})
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["method"] == "cd" and cfg["iters"] == 6 and cfg["batch_size"] == 32
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["model"] for r in metrics["table"]] == ["teacher (best)", "teacher", "student", "student"]
    assert [r["steps"] for r in metrics["table"]][2:] == [1, 2]
    assert all(r["metric"] == "swd" and r["value"] > 0 for r in metrics["table"])
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log if "losses" in r and "event" not in r] == [1, 2, 3, 4, 5, 6]
    assert {"samples/step_00000003.png", "samples/step_00000006.png", "samples/final_1step.png"} <= {
        str(p.relative_to(run)) for p in run.rglob("*.png")}
    assert (run / "student" / "model.safetensors").is_file() and (run / "student_online" / "config.json").is_file()
    assert [p.name for p in ckpt.checkpoint_dirs(run)] == ["step_00000003", "step_00000006"]
    assert res["student"] == str(run / "student")
    # the EMA (what is sampled) differs from the online weights after a few steps
    ema, online = weights(run), weights(run, "student_online")
    assert any(not torch.equal(ema[k], online[k]) for k in ema)


def test_resume_is_bit_exact_2d(tmp_path, resume_matches):
    resume_matches(tmp_path, **FAST)


def test_resume_is_bit_exact_lcm_digits_with_three_roles(tmp_path, resume_matches):
    # LCM on the class-conditional digits teacher: student with a guidance input, EMA target, EMA of the student
    resume_matches(tmp_path, **{**FAST, "method": "lcm", "teacher": "digits", "batch_size": 8, "ema": "power"})


def test_resume_refuses_changed_fields_and_missing_runs(tmp_path):
    run = tmp_path / "run"
    distill(out=str(run), iters=4, stop_after=2, **FAST)
    with pytest.raises(FewstepError, match="cannot change lr"):
        distill(out=str(run), resume=True, lr=0.5)
    with pytest.raises(FewstepError, match="nothing to resume"):
        distill(out=str(tmp_path / "nope"), resume=True)


def test_new_run_never_overwrites(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("x")
    with pytest.raises(FewstepError, match="already exists"):
        distill(out=str(run), iters=2, **FAST)
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]


def test_checkpoint_is_atomic_when_a_save_is_killed(tmp_path, monkeypatch):
    run = tmp_path / "run"
    distill(out=str(run), iters=4, stop_after=2, **FAST)
    good = ckpt.latest_checkpoint(run)
    assert good.name == "step_00000002"

    import safetensors.torch as st

    real_save = st.save_file

    def dying_save(tensors, path, *a, **k):  # writes half a file, then the process "dies"
        real_save(dict(list(tensors.items())[: len(tensors) // 2]), path, *a, **k)
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(st, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        distill(out=str(run), resume=True, stop_after=1)
    monkeypatch.setattr(st, "save_file", real_save)
    # no partial checkpoint looks valid: the latest is still the good one, and it loads
    assert ckpt.latest_checkpoint(run) == good
    tensors, meta = ckpt.load_checkpoint(good)
    assert meta["iteration"] == 2 and any(k.startswith("net.student.") for k in tensors)
    # a leftover from a save killed by SIGKILL (temp dir never cleaned) is ignored, then removed on resume
    stale = run / "checkpoints" / ".step_00000003.abc.tmp"
    stale.mkdir()
    (stale / "state.json").write_text("{}")
    assert ckpt.latest_checkpoint(run) == good
    res = distill(out=str(run), resume=True)
    assert res["iterations"] == 4 and not stale.exists()


class _NaNAfter(DistillMethod):
    """A one-network method whose loss turns NaN at iteration 3 (0-based)."""

    needs_data = False

    def networks(self):
        return {"teacher": Role(self.teacher), "student": Role(self.student_from_teacher(), trainable=True)}

    def phases(self):
        return [Phase("student", ("student",))]

    def loss(self, phase, batch, nets, ctx):
        x = ctx.randn((batch.size, 2))
        out = nets["student"](x, torch.full((batch.size,), 0.5), None).pow(2).mean()
        return {"loss": out * (float("nan") if ctx.iteration >= 3 else 1.0)}


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, register):
    register("nan-after-3", _NaNAfter)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as e:
        distill(out=str(run), iters=10, checkpoint_every=2, **{**FAST, "method": "nan-after-3"})
    msg = str(e.value)
    assert "non-finite" in msg and "iteration 4" in msg and "step_00000002" in msg and "\n" not in msg
    assert [p.name for p in ckpt.checkpoint_dirs(run)] == ["step_00000002"]
    assert ckpt.load_checkpoint(run / "checkpoints" / "step_00000002")[1]["iteration"] == 2
    assert not (run / "student").exists()


class _Counting(DistillMethod):
    """Two phases, the generator every 3rd iteration (DMD2-style TTUR by update ratio)."""

    needs_data = False
    calls: list = []

    def networks(self):
        return {"teacher": Role(self.teacher), "student": Role(self.student_from_teacher(), trainable=True),
                "critic": Role(self.student_from_teacher(), trainable=True, lr_scale=5.0, betas=(0.0, 0.99))}

    def phases(self):
        return [Phase("critic", ("critic",)), Phase("generator", ("student",), every=3)]

    def loss(self, phase, batch, nets, ctx):
        type(self).calls.append((ctx.iteration, phase))
        net = nets["critic"] if phase == "critic" else nets["student"]
        x = ctx.randn((batch.size, 2))
        return {"loss": net(x, torch.full((batch.size,), 0.5), None).pow(2).mean()}


def test_update_ratio_and_per_role_optimizers(tmp_path, register):
    register("counting", _Counting)
    _Counting.calls = []
    distill(out=str(tmp_path / "run"), iters=7, lr=1e-3, **{**FAST, "method": "counting", "warmup": 0})
    crit = [i for i, p in _Counting.calls if p == "critic"]
    gen = [i for i, p in _Counting.calls if p == "generator"]
    assert crit == list(range(7)) and gen == [0, 3, 6]
    tensors, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    groups = {k: v["param_groups"][0] for k, v in meta["optimizers"].items()}
    assert groups["critic"]["lr"] == pytest.approx(5e-3) and groups["student"]["lr"] == pytest.approx(1e-3)
    assert list(groups["critic"]["betas"]) == [0.0, 0.99]
    # Adam step counters: 7 critic updates, 3 generator updates
    assert float(tensors["opt.critic.0.step"]) == 7 and float(tensors["opt.student.0.step"]) == 3


def test_grad_accumulation_runs_micro_batches_per_optimizer_step(tmp_path, register):
    register("counting", _Counting)
    _Counting.calls = []
    distill(out=str(tmp_path / "a"), iters=4, grad_accum=2, **{**FAST, "method": "counting", "batch_size": 16})
    assert [p for i, p in _Counting.calls if i == 0] == ["critic", "critic", "generator", "generator"]
    tensors, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "a"))
    assert float(tensors["opt.critic.0.step"]) == 4 and float(tensors["opt.student.0.step"]) == 2
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert "critic/loss" in log[0]["losses"] and "generator/loss" in log[0]["losses"]


def test_ema_decays():
    assert ema_decay_at("fixed", 1, 0.999) == pytest.approx(2 / 11)
    assert ema_decay_at("fixed", 10_000, 0.999) == 0.999
    assert ema_decay_at("power", 1, gamma=6.94) == 0.0
    assert ema_decay_at("power", 100, gamma=6.94) == pytest.approx((1 - 1 / 100) ** 7.94)


def test_yaml_recipe_and_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "cd", "teacher": "toy:moons", "iters": 3, "batch_size": 16,
                                      "options": {"num_timesteps": 10}, "eval": False, "sample_every": 0}))
    run = tmp_path / "run"
    distill(str(recipe), out=str(run), iters=2)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["iters"] == 2 and cfg["teacher"] == "toy:moons" and cfg["options"]["num_timesteps"] == 10
    assert cfg["lr"] == 1e-3  # filled from the cd recipe for 2-D data
    with pytest.raises(FewstepError, match="unknown config field"):
        distill({"nope": 1}, out=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(os.environ.get("FEWSTEP_SKIP_DDP") == "1", reason="explicitly disabled")
def test_two_cpu_processes_hold_identical_weights(tmp_path):
    """DDP over gloo with two CPU processes (accelerate launch): both ranks end with the same weights,
    different from the teacher, and rank 0 writes the run."""
    import subprocess
    import sys

    script = Path(__file__).with_name("ddp_worker.py")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the launch line that works on CPU (ENVIRONMENT.md): --multi_gpu with 2 processes, cpu=True inside
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), str(run)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = sorted((tmp_path / "run").glob("rank*.json"))
    assert len(digests) == 2
    a, b = (json.loads(p.read_text()) for p in digests)
    assert a["world_size"] == b["world_size"] == 2
    assert a["student"] == b["student"] and a["ema"] == b["ema"]
    assert a["student"] != a["teacher"]
    assert a["first_batch"] != b["first_batch"]  # each rank trains on its own data
    assert (run / "student" / "model.safetensors").is_file()
    # a 2-process run stopped and resumed (every rank's RNG streams gathered and restored) ends as one uninterrupted
    proc = subprocess.run(cmd[:-2] + [str(script), "resume", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for sub in ("student", "student_online"):
        full, split = weights(tmp_path / "full", sub), weights(tmp_path / "split", sub)
        assert all(torch.equal(full[k], split[k]) for k in full)


def test_destroy_process_group_tears_down_an_initialised_group():
    import torch.distributed as dist

    from fewstep.training.accelerator import destroy_process_group

    destroy_process_group()  # nothing initialised: a no-op
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.is_initialized()
    destroy_process_group()
    assert not dist.is_initialized()


def test_default_run_is_cd_on_the_checkerboard():
    from fewstep.training.run import prepare_run

    cfg = prepare_run({}, explicit=set(), check_out=False)
    assert (cfg.method, cfg.teacher, cfg.iters, cfg.batch_size) == ("cd", "toy:checkerboard", 1000, 256)
    assert cfg.out.startswith("runs/cd-toy_checkerboard-")


def test_bf16_mixed_precision_on_cpu(tmp_path, monkeypatch):
    from fewstep.models.mlp import MLPNet

    seen = []
    real_forward = MLPNet.forward

    def recording_forward(self, *a, **k):
        out = real_forward(self, *a, **k)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(MLPNet, "forward", recording_forward)
    run = tmp_path / "run"
    distill(out=str(run), iters=3, mixed_precision="bf16", **FAST)
    assert torch.bfloat16 in seen  # the networks ran under bf16 autocast
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(v == v and abs(v) < 1e6 for r in log for v in r["losses"].values())
    from fewstep.api import load_model

    assert next(load_model(run).parameters()).dtype == torch.float32  # weights stay fp32


class _InfGrad(_NaNAfter):
    """The same one-network method, but a finite loss whose gradient becomes infinite at iteration 2."""

    def loss(self, phase, batch, nets, ctx):
        out = nets["student"](ctx.randn((batch.size, 2)), torch.full((batch.size,), 0.5), None)
        if ctx.iteration >= 2:
            out.register_hook(lambda g: g * float("inf"))
        return {"loss": out.pow(2).mean()}


def test_infinite_gradients_stop_before_the_weights_are_touched(tmp_path, register):
    register("inf-grad", _InfGrad)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="grad_norm_student"):
        distill(out=str(run), iters=10, checkpoint_every=1, **{**FAST, "method": "inf-grad"})
    tensors, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert meta["iteration"] == 2
    assert all(bool(torch.isfinite(v).all()) for k, v in tensors.items() if k.startswith("net.student."))


def test_a_run_that_cannot_start_writes_nothing(tmp_path):
    for kw, needle in (({"device": "cuda"}, "CUDA"), ({"data": "digits"}, "shape")):
        if kw.get("device") == "cuda" and torch.cuda.is_available():
            continue
        with pytest.raises(FewstepError, match=needle):
            distill(out=str(tmp_path / "run"), iters=2, **{**FAST, **kw})
        assert not (tmp_path / "run").exists()


def test_ctrl_c_finishes_the_iteration_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    import signal

    from fewstep.methods.consistency import ConsistencyDistillation

    kw = dict(iters=6, checkpoint_every=0, **FAST)
    distill(out=str(tmp_path / "full"), **kw)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job

    real_loss = ConsistencyDistillation.loss
    sent = []

    def loss_then_ctrl_c(self, phase, batch, nets, ctx):
        out = real_loss(self, phase, batch, nets, ctx)
        if ctx.iteration == 2 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C mid-iteration
        return out

    monkeypatch.setattr(ConsistencyDistillation, "loss", loss_then_ctrl_c)
    res = distill(out=str(tmp_path / "split"), **kw)
    assert res["interrupted"] and not res["finished"] and res["iterations"] == 3
    assert ckpt.latest_checkpoint(tmp_path / "split").name == "step_00000003"
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    monkeypatch.setattr(ConsistencyDistillation, "loss", real_loss)
    distill(out=str(tmp_path / "split"), resume=True)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


class _ThroughCritic(_Counting):
    """The generator's loss runs through the critic (like DMD2's GAN term): only the student may get gradients."""

    seen: list = []

    def loss(self, phase, batch, nets, ctx):
        x = ctx.randn((batch.size, 2))
        t = torch.full((batch.size,), 0.5)
        if phase == "critic":
            return {"loss": nets["critic"](x, t, None).pow(2).mean()}
        critic_params = list(nets["critic"].parameters())
        type(self).seen.append((all(not p.requires_grad for p in critic_params),
                                all(p.requires_grad for p in nets["student"].parameters())))
        out = nets["critic"](nets["student"](x, t, None), t, None).pow(2).mean()
        return {"loss": out}


def test_a_phase_back_propagates_only_into_the_roles_it_trains(tmp_path, register):
    register("through-critic", _ThroughCritic)
    _ThroughCritic.seen = []
    run = tmp_path / "run"
    distill(out=str(run), iters=4, **{**FAST, "method": "through-critic", "warmup": 0})
    assert _ThroughCritic.seen == [(True, True), (True, True)]  # iterations 0 and 3
    # the critic still trains in its own phase: 4 Adam steps, the student 2
    tensors, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert float(tensors["opt.critic.0.step"]) == 4 and float(tensors["opt.student.0.step"]) == 2


def test_bf16_keeps_the_frozen_teacher_in_bf16_and_scores_it_in_fp32(tmp_path, monkeypatch):
    from fewstep.models.mlp import MLPNet
    from fewstep.teachers import load_teacher, teacher_path
    from fewstep.training.report import evaluate_model

    weight_dtypes = set()
    real_forward = MLPNet.forward

    def recording_forward(self, *a, **k):
        weight_dtypes.add(self.inp.weight.dtype)
        return real_forward(self, *a, **k)

    monkeypatch.setattr(MLPNet, "forward", recording_forward)
    run = tmp_path / "run"
    teacher_dir = str(teacher_path("toy:checkerboard"))  # a path: the trainer's own copy is the one scored
    res = distill(out=str(run), iters=2, mixed_precision="bf16", eval_num=512, eval_steps=[1],
                  **{**FAST, "teacher": teacher_dir, "eval": True})
    assert weight_dtypes == {torch.bfloat16, torch.float32}  # the teacher in bf16, the student in fp32
    monkeypatch.setattr(MLPNet, "forward", real_forward)
    best = evaluate_model(load_teacher("toy:checkerboard"), "toy:checkerboard", steps=50, solver="heun", num=512)
    assert res["table"][0]["model"] == "teacher (best)" and res["table"][0]["value"] == pytest.approx(best["value"])


def test_exponent_numbers_without_a_dot_are_floats_in_recipes_and_options(tmp_path):
    from fewstep.training.config import load_yaml, parse_option

    # PyYAML reads YAML 1.1, where 1e-3 is a string; recipes and --opt values get a float
    assert parse_option("huber_c=1e-3") == ("huber_c", 0.001) and parse_option("lr=5E4") == ("lr", 50000.0)
    assert parse_option("steps=[1e-1, 2]") == ("steps", [0.1, 2]) and parse_option("name=e5") == ("name", "e5")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-3\nwarmup: 10\n")
    assert load_yaml(recipe) == {"lr": 0.001, "warmup": 10}
