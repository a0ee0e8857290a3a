"""Reflow: the straight-line target in any process, the one-step distillation target, stages and options,
pairs under RUN/pairs/, straightness in metrics.json, exact resume within and across rounds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from fewstep.diffusion import RectifiedFlow, VPDiscrete
from fewstep.errors import FewstepError
from fewstep.methods import Batch, StepContext, available_methods, build_method_config, get_method
from fewstep.models import Denoiser
from fewstep.sampling import flow_scale, flow_time
from fewstep.sampling.pairs import PairSet, generate_pairs
from fewstep.teachers import load_teacher
from fewstep.training import checkpoint as ckpt
from fewstep.training import distill

TINY = {"pair_num": 64, "pair_steps": 4, "pair_shard_size": 32, "straightness_num": 32, "straightness_steps": 4}


class Recorder(nn.Module):
    """A small velocity network that remembers what it was called with."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 2, generator=g))
        self.calls = []

    def forward(self, x, t, cond=None):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        u = (t / (1 + t))[:, None].to(x.dtype)  # bounded for any process time (VP steps reach 999)
        return torch.tanh(torch.cat([x, u], 1) @ self.w)


def _method(process, prediction, options=None):
    teacher = Denoiser(Recorder(), process, prediction, data_shape=(2,)).requires_grad_(False)
    method = get_method("reflow")(teacher, build_method_config("reflow", {"loss": "l2", **(options or {})}))
    student = method.networks()["student"].module
    g = torch.Generator().manual_seed(1)
    method.pairs = PairSet(torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g))
    return method, student


def _ctx(seed=0):
    return StepContext(iteration=0, generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"))


@pytest.mark.parametrize("process,prediction", [(RectifiedFlow(), "flow"),
                                                (VPDiscrete.from_schedule("scaled_linear"), "eps")],
                         ids=["flow", "vp-eps"])
def test_loss_regresses_the_velocity_onto_z_minus_x_on_the_straight_line(process, prediction):
    method, student = _method(process, prediction, {"time_dist": "uniform"})
    student.net.calls.clear()
    out = method.loss("student", Batch(size=8), {"student": student}, _ctx(3))
    # replay the draws: pairs first, then the flow times
    g = torch.Generator().manual_seed(3)
    z, x, _ = method.pairs.sample(8, g)
    s_raw = method.s_lo + (method.s_hi - method.s_lo) * torch.rand(8, generator=g, dtype=torch.float64)
    (x_t, t), = student.net.calls
    s = flow_time(process, t.double())
    torch.testing.assert_close(s, s_raw, rtol=1e-5, atol=1e-6)  # the model time of the drawn flow time
    # the student sees the straight-line state alpha(t) x + sigma(t) z of its own process
    torch.testing.assert_close(x_t, process.add_noise(x, z, t.double()).float(), rtol=1e-5, atol=1e-5)
    # its flow velocity eps_hat - x0_hat (from the exact prediction conversions) regresses onto z - x
    with torch.no_grad():
        x0_hat = student.predict(x_t, t, kind="x0")
        eps_hat = student.predict(x_t, t, kind="eps")
    expected = ((eps_hat - x0_hat) - (z - x)).pow(2).mean()
    torch.testing.assert_close(out["loss"], expected, rtol=2e-4, atol=1e-6)
    out["loss"].backward()
    assert student.net.w.grad is not None and float(student.net.w.grad.abs().sum()) > 0


def test_flow_loss_is_the_plain_velocity_regression_and_weights_apply():
    method, student = _method(RectifiedFlow(), "flow", {"time_dist": "uniform", "loss_weight": "one_minus_t"})
    student.net.calls.clear()
    out = method.loss("student", Batch(size=8), {"student": student}, _ctx(5))
    g = torch.Generator().manual_seed(5)
    z, x, _ = method.pairs.sample(8, g)
    (x_t, t), = student.net.calls
    torch.testing.assert_close(x_t, (1 - t[:, None]) * x + t[:, None] * z)
    with torch.no_grad():
        v = student.net.forward(x_t, t)  # the network's own velocity
    per = (v - (z - x)).pow(2).mean(1)
    torch.testing.assert_close(out["loss"], ((1 - t) * per).mean(), rtol=1e-4, atol=1e-6)


def test_distillation_stage_trains_the_single_euler_step_from_the_samplers_start():
    for process, prediction in ((RectifiedFlow(), "flow"), (VPDiscrete.from_schedule("scaled_linear"), "eps")):
        method, student = _method(process, prediction)
        method.stage = {"kind": "distill", "round": 1, "start": 0}
        student.net.calls.clear()
        out = method.loss("student", Batch(size=8), {"student": student}, _ctx(2))
        z, x, _ = method.pairs.sample(8, torch.Generator().manual_seed(2))
        (x_t, t), = student.net.calls
        t0 = float(process.t_max)
        assert torch.all(t == t0)
        torch.testing.assert_close(x_t, z * float(process.prior_std(torch.tensor(t0))))  # what 1-step sampling feeds
        with torch.no_grad():
            x0_hat = student(x_t, t)
        s0 = float(flow_time(process, torch.tensor(t0, dtype=torch.float64)))
        torch.testing.assert_close(out["loss"], ((x0_hat - x) / s0).pow(2).mean(), rtol=1e-4, atol=1e-6)
        if isinstance(process, RectifiedFlow):  # = the velocity at pure noise regressed onto z - x
            torch.testing.assert_close(out["loss"], (student.net.forward(x_t, t) - (z - x)).pow(2).mean().detach(),
                                       rtol=1e-4, atol=1e-6)
        assert float(flow_scale(process, torch.tensor(t0))) > 0


def test_distillation_can_keep_part_of_each_batch_on_the_straight_line():
    method, student = _method(RectifiedFlow(), "flow", {"distill_mix": 0.25, "time_dist": "uniform"})
    method.stage = {"kind": "distill", "round": 1, "start": 0}
    student.net.calls.clear()
    out = method.loss("student", Batch(size=8), {"student": student}, _ctx(4))
    g = torch.Generator().manual_seed(4)
    z, x, _ = method.pairs.sample(8, g)
    s_line = method.s_lo + (method.s_hi - method.s_lo) * torch.rand(2, generator=g, dtype=torch.float64)
    (x_t, t), = student.net.calls
    torch.testing.assert_close(t[:2].double(), s_line, rtol=1e-6, atol=1e-7)  # 2 of 8 rows: a random time
    assert torch.all(t[2:] == 1.0) and torch.equal(x_t[2:], z[2:])  # the rest: the one step from pure noise
    torch.testing.assert_close(x_t[:2], (1 - t[:2, None]) * x[:2] + t[:2, None] * z[:2])
    with torch.no_grad():
        v = student.net.forward(x_t, t)
    torch.testing.assert_close(out["loss"], (v - (z - x)).pow(2).mean(), rtol=1e-4, atol=1e-6)


def test_u_shaped_times_favour_both_ends():
    method, _ = _method(RectifiedFlow(), "flow")
    s = method.sample_flow_times(20000, torch.Generator().manual_seed(0))
    assert float(s.min()) >= method.s_lo and float(s.max()) <= 1.0
    ends = ((s < 0.1) | (s > 0.9)).float().mean()
    middle = ((s > 0.4) & (s < 0.6)).float().mean()
    assert ends > 2.5 * middle


def test_plan_options_and_errors():
    assert "reflow" in available_methods()
    teacher = load_teacher("toy:checkerboard")
    m = get_method("reflow")(teacher, build_method_config("reflow", {"rounds": 2, "distill_1step": True}))
    assert m.make_plan(10) == [{"kind": "reflow", "round": 1, "start": 0}, {"kind": "reflow", "round": 2, "start": 3},
                               {"kind": "distill", "round": 2, "start": 7}]
    with pytest.raises(FewstepError, match="--iters 2 leaves a reflow stage without iterations"):
        m.make_plan(2)
    for opts, needle in (({"rounds": 0}, "rounds"), ({"pair_solver": "fewstep"}, "pair_solver"),
                         ({"time_dist": "beta"}, "time_dist"), ({"loss": "l1"}, "unknown loss"),
                         ({"loss_weight": "snr"}, "loss_weight"), ({"distill_share": 1.5}, "distill_share"),
                         ({"pairs": "/nonexistent"}, "not a pair set")):
        with pytest.raises(FewstepError, match=needle):
            get_method("reflow")(teacher, build_method_config("reflow", opts))


FAST = dict(method="reflow", teacher="toy:checkerboard", batch_size=16, eval=False, sample_every=0, warmup=2,
            log_every=1)


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_run_layout_straightness_and_sampler_defaults(tmp_path):
    run = tmp_path / "run"
    res = distill(out=str(run), iters=6, options={**TINY, "rounds": 2}, **FAST)
    assert sorted(p.name for p in (run / "pairs").iterdir()) == ["round_1", "round_2"]
    m1 = json.loads((run / "pairs" / "round_1" / "manifest.json").read_text())
    m2 = json.loads((run / "pairs" / "round_2" / "manifest.json").read_text())
    assert (m1["num"], m1["steps"], m1["solver"], m1["seed"]) == (64, 4, "heun", 0) and m2["seed"] == 1
    assert m1["teacher_sha256"] != m2["teacher_sha256"]  # round 2's pairs come from round 1's student
    # straightness: teacher, after round 1, after round 2 (final); in the result, metrics.json and the log
    after = [r["after"] for r in res["straightness"]]
    assert after == ["teacher", "round 1", "round 2"] and all(r["value"] > 0 for r in res["straightness"])
    assert json.loads((run / "metrics.json").read_text())["straightness"] == res["straightness"]
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["after"] for r in log if r.get("event") == "straightness"] == after
    # the reflowed flow samples with Euler at few steps; round 1's flow is kept as a model directory
    student = json.loads((run / "student" / "config.json").read_text())["meta"]
    assert (student["default_solver"], student["default_steps"], student["method"]) == ("euler", 2, "reflow")
    round1 = json.loads((run / "round_1" / "config.json").read_text())["meta"]
    assert (round1["default_solver"], round1["default_steps"]) == ("euler", 2)


def test_distilled_student_samples_with_one_step_and_given_pairs_are_used(tmp_path):
    teacher = load_teacher("toy:checkerboard")
    generate_pairs(teacher, tmp_path / "pairs", 40, steps=3, shard_size=16, teacher_spec="toy:checkerboard")
    run = tmp_path / "run"
    res = distill(out=str(run), iters=6, options={**TINY, "pairs": str(tmp_path / "pairs"), "distill_1step": True},
                  **FAST)
    assert not (run / "pairs").exists()  # round 1 trained on the given set
    assert [r["after"] for r in res["straightness"]] == ["teacher", "round 1", "1-step distillation"]
    meta = json.loads((run / "student" / "config.json").read_text())["meta"]
    assert (meta["default_solver"], meta["default_steps"]) == ("euler", 1)
    from fewstep.api import load_model, sample

    assert load_model(str(run)).meta["default_steps"] == 1
    assert sample(str(run), num=8)["steps"] == 1
    # pairs from another teacher are refused before anything is written
    generate_pairs(load_teacher("toy:moons"), tmp_path / "moons", 8, steps=2)
    with pytest.raises(FewstepError, match="another model"):
        distill(out=str(tmp_path / "bad"), iters=4, options={**TINY, "pairs": str(tmp_path / "moons")}, **FAST)
    assert not (tmp_path / "bad").exists()


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_resume_mid_round_and_across_rounds_is_bit_exact(tmp_path, monkeypatch):
    import fewstep.methods.reflow as reflow

    kw = dict(iters=10, checkpoint_every=0, options={**TINY, "rounds": 2, "distill_1step": True}, **FAST)
    full, split = tmp_path / "full", tmp_path / "split"
    distill(out=str(full), **kw)  # stages: round 1 at 0, round 2 at 3, distillation at 7
    calls = []
    real = reflow.generate_pairs
    monkeypatch.setattr(reflow, "generate_pairs", lambda *a, **k: calls.append(str(a[1])) or real(*a, **k))
    distill(out=str(split), stop_after=2, **kw)  # mid round 1
    assert [Path(c).name for c in calls] == ["round_1"]
    distill(out=str(split), resume=True, stop_after=3)  # 2 -> 5: into round 2 (its pairs are made at 3)
    assert [Path(c).name for c in calls] == ["round_1", "round_2"]
    state = json.loads((ckpt.latest_checkpoint(split) / "state.json").read_text())["method_state"]
    assert state["begun"] == [0, 1] and [r["after"] for r in state["records"]] == ["teacher", "round 1"]
    distill(out=str(split), resume=True, stop_after=3)  # 5 -> 8: mid round 2, then into the distillation
    distill(out=str(split), resume=True)  # 8 -> 10
    assert len(calls) == 2  # pairs of a round are never made again on resume
    for sub in ("student", "student_online", "round_1", "round_2"):
        a, b = weights(full / sub), weights(split / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    assert _files(full / "pairs") == _files(split / "pairs")
    fm, sm = (json.loads((d / "metrics.json").read_text()) for d in (full, split))
    assert fm["straightness"] == sm["straightness"]
    flog, slog = ([(r["iteration"], r.get("event")) for r in map(json.loads, (d / "log.jsonl").read_text().splitlines())
                   if r.get("event") != "quality"] for d in (full, split))
    assert flog == slog
    assert yaml.safe_load((split / "config.yaml").read_text())["options"]["rounds"] == 2


@pytest.mark.skipif(os.environ.get("FEWSTEP_SKIP_DDP") == "1", reason="explicitly disabled")
def test_two_processes_share_the_pair_shards(tmp_path):
    """DDP over gloo: every rank makes its shards of each round's pairs (worker = rank); the set is the one a
    single process makes, byte for byte, and the 2-round run finishes with its straightness records."""
    import subprocess
    import sys

    script = Path(__file__).with_name("reflow_ddp_worker.py")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    import socket

    with socket.socket() as sock:  # a free port: other test runs on this machine may hold accelerate's default
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(script), str(run)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run / "result.json").read_text())
    assert res["world_size"] == 2 and res["finished"]
    assert [r["after"] for r in res["straightness"]] == ["teacher", "round 1", "round 2"]
    opts = res["options"]
    generate_pairs(load_teacher("toy:checkerboard"), tmp_path / "single", opts["pair_num"],
                   steps=opts["pair_steps"], shard_size=opts["pair_shard_size"], teacher_spec="teacher")
    assert _files(run / "pairs" / "round_1") == _files(tmp_path / "single")
    assert len(list((run / "pairs" / "round_2").glob("shard_*"))) == 6
    assert (run / "student" / "model.safetensors").is_file()
