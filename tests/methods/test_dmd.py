"""DMD / DMD2 / SiD: the distribution-matching gradient on Gaussians with known scores, the three-network
machinery (fake-score loss, GAN head, backward simulation, TTUR), memory rules and resume."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fewstep.diffusion import RectifiedFlow
from fewstep.errors import FewstepError
from fewstep.methods import Batch, StepContext, build_method_config, get_method
from fewstep.models import Denoiser
from fewstep.teachers import load_teacher
from fewstep.training import checkpoint as ckpt
from fewstep.training import distill


class GaussianFlowNet(nn.Module):
    """The exact flow-matching velocity of data N(mu, s2 I) under x_t = (1 - t) x0 + t eps:
    x0_hat = mu + a s2 / (a^2 s2 + t^2) (x_t - a mu) with a = 1 - t, velocity = eps_hat - x0_hat."""

    def __init__(self, mu, s2):
        super().__init__()
        self.mu = nn.Parameter(torch.as_tensor(mu, dtype=torch.float32))
        self.s2 = nn.Parameter(torch.as_tensor(float(s2)))

    def forward(self, x, t, cond=None):
        a, s = (1 - t)[:, None], t[:, None]
        x0 = self.mu + a * self.s2 / (a * a * self.s2 + s * s) * (x - a * self.mu)
        eps = (x - a * x0) / s
        return eps - x0


def gaussian(mu, s2):
    return Denoiser(GaussianFlowNet(mu, s2), RectifiedFlow(), "flow", data_shape=(2,))


def gaussian_score(x_t, t, mu, s2):
    """grad log p_t(x_t) for data N(mu, s2 I): -(x_t - a mu) / (a^2 s2 + t^2)."""
    a = (1 - t)[:, None]
    return -(x_t - a * torch.as_tensor(mu)) / (a * a * s2 + (t * t)[:, None])


def ctx(seed=0):
    return StepContext(iteration=0, generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"))


def method_with_fake(name, real, fake, **opts):
    method = get_method(name)(real, build_method_config(name, opts))
    nets = {k: r.module for k, r in method.networks().items()}
    nets["fake_score"] = fake
    return method, nets


@pytest.mark.parametrize("s2_fake", [0.25, 1.0])
def test_dm_gradient_points_from_the_fake_toward_the_real_score(s2_fake):
    """With exact scores of N(mu_r, 0.25 I) (real) and N(mu_f, s2_fake I) (fake), the generator's update
    -dL/dx is a positive multiple of score_real(x_t) - score_fake(x_t), sample by sample."""
    mu_r, mu_f = [1.0, -0.5], [-1.0, 0.5]
    method, nets = method_with_fake("dmd2", gaussian(mu_r, 0.25), gaussian(mu_f, s2_fake))
    x = (torch.tensor(mu_f) + s2_fake ** 0.5 * torch.randn(64, 2, generator=torch.Generator().manual_seed(1)))
    x.requires_grad_(True)
    loss, _ = method.dm_loss(nets, x, None, ctx(7))
    loss.backward()
    update = -x.grad
    c = method.config
    x_t, t, _ = method.noised(x.detach(), ctx(7), c.t_min, c.t_max)  # the same draws as inside dm_loss
    gap = gaussian_score(x_t, t, mu_r, 0.25) - gaussian_score(x_t, t, mu_f, s2_fake)
    cos = torch.nn.functional.cosine_similarity(update, gap, dim=1)
    assert torch.all(cos > 1 - 1e-4)
    assert bool(torch.all((0.02 <= t) & (t <= 0.98)))
    if s2_fake == 0.25:  # equal variances: the update is along mu_r - mu_f everywhere
        along = torch.nn.functional.cosine_similarity(update, (torch.tensor(mu_r) - torch.tensor(mu_f))[None], dim=1)
        assert torch.all(along > 1 - 1e-4)


class ShiftGenerator(nn.Module):
    """A generator x = 0.5 z + b as a flow 'Denoiser' network called at t = 1 (x_1 = z): velocity z - x."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(2))

    def forward(self, x, t, cond=None):
        x0 = 0.5 * x + self.b
        return x - x0  # at t = 1: eps - x0 with eps = x


@pytest.mark.parametrize("name", ["dmd", "sid"])
def test_generator_loss_moves_a_shift_generator_onto_the_real_mean(name):
    """Real data N(mu, 0.25 I); the fake score is kept exact for the generator's current distribution
    N(b, 0.25 I); a few hundred generator steps of DMD or SiD bring b to mu."""
    mu = torch.tensor([1.5, -1.0])
    real = gaussian(mu, 0.25)
    gen = Denoiser(ShiftGenerator(), RectifiedFlow(), "flow", data_shape=(2,))
    method = get_method(name)(real, build_method_config(name, {"regression_weight": 0.0} if name == "dmd" else {}))
    opt = torch.optim.Adam(gen.parameters(), lr=0.05)
    c = ctx(0)
    for _ in range(300):
        fake = gaussian(gen.net.b.detach().clone(), 0.25)
        nets = {"teacher": real, "fake_score": fake.requires_grad_(False), "student": gen}
        x = method.generate(gen, Batch(size=128), c)
        loss, _ = method.generator_objective(nets, x, None, c)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(gen.net.b.detach(), mu, atol=0.05)


def test_sid_gradient_vanishes_when_fake_equals_real():
    real = gaussian([0.5, 0.5], 0.3)
    method, nets = method_with_fake("sid", real, gaussian([0.5, 0.5], 0.3).requires_grad_(False))
    x = torch.randn(32, 2, requires_grad=True)
    loss, _ = method.sid_loss(nets, x, None, ctx())
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6) and float(x.grad.abs().max()) < 1e-6


def test_fake_score_is_trained_with_the_teachers_own_objective():
    """The denoising loss of an exact score on its own data is the irreducible flow-matching loss (its
    minimum); a wrong mean costs more."""
    real = gaussian([0.0, 0.0], 0.25)
    method = get_method("dmd2")(real)
    x = 0.5 * torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = method.denoising_loss(gaussian([0.0, 0.0], 0.25), x, None, ctx(3))
        shifted = method.denoising_loss(gaussian([0.5, 0.0], 0.25), x, None, ctx(3))
        assert float(shifted) > float(exact) + 0.01
        # for a flow teacher the native objective is the velocity MSE: the same draws, computed by hand
        x_t, t, eps = method.noised(x, ctx(3), 0.0, 1.0)
        v = gaussian([0.0, 0.0], 0.25).net(x_t, t)
    assert float(exact) == pytest.approx(float(((v - (eps - x)) ** 2).mean()), rel=1e-5)


def test_backward_simulation_feeds_the_generator_its_own_rollout():
    """4-step generator (flow times 1, .75, .5, .25): the input at t_k comes from k no-grad generator steps
    with fresh noise; with a generator whose x0 is always c, that input is (1 - t_k) c + t_k z."""
    teacher = load_teacher("toy:checkerboard")
    method = get_method("dmd2")(teacher, build_method_config("dmd2", {"steps": 4}))
    assert method.gen_times.tolist() == [1.0, 0.75, 0.5, 0.25]
    assert method.student_meta()["timesteps"] == {"4": [1.0, 0.75, 0.5, 0.25]}
    calls = []

    class Constant(nn.Module):
        def forward(self, x, t, cond=None, guidance=1.0, kind="x0"):
            calls.append((t.clone(), torch.is_grad_enabled(), x.clone()))
            return torch.full_like(x, 3.0)

    out = method.generate(Constant(), Batch(size=256), ctx(5))
    assert torch.equal(out, torch.full((256, 2), 3.0))
    *sim, last = calls
    assert all(not grad for _, grad, _ in sim) and last[1]  # only the last call keeps the graph
    k = (4 * (1 - last[0])).round().long()  # t_k = 1 - k/4
    assert set(k.tolist()) == {0, 1, 2, 3} and len(sim) == int(k.max())
    x_in, t_in = last[2], last[0]
    z = (x_in[k > 0] - (1 - t_in[k > 0, None]) * 3.0) / t_in[k > 0, None]
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1  # fresh unit noise around the rollout
    assert torch.equal(x_in[k == 0], sim[0][2][k == 0])  # k = 0: the prior noise itself


def test_gan_head_reads_the_fake_scores_bottleneck_and_needs_real_data(tmp_path):
    from fewstep.models.gan import DiscriminatorHead

    digits = load_teacher("digits")
    method = get_method("dmd2")(digits, build_method_config("dmd2", {"gan": True}))
    roles = method.networks()
    head = roles["discriminator"].module
    assert isinstance(head, DiscriminatorHead) and head.feature_shape == (32, 4, 4)  # the UNet's mid block
    assert roles["discriminator"].trainable and method.needs_data
    assert [p.trains for p in method.phases()] == [("fake_score", "discriminator"), ("student",)]
    nets = {k: r.module for k, r in roles.items()}
    x0 = torch.randn(8, 1, 8, 8)
    logits = method.gan_logits(nets, x0, torch.arange(8), ctx())
    assert logits.shape == (8,)
    out = method.loss("critic", Batch(size=8, cond=torch.arange(8), x0=x0), nets, ctx())
    assert {"denoise", "gan_d", "d_real", "d_fake"} <= set(out)
    out["loss"].backward()
    assert all(p.grad is not None for p in head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["fake_score"].parameters())
    teacher_2d = load_teacher("toy:checkerboard")
    teacher_2d.meta.pop("data")  # a teacher that does not say what it was trained on
    with pytest.raises(FewstepError, match="trains on real data: pass --data"):
        distill(method="dmd2", teacher="toy:checkerboard", teacher_model=teacher_2d, options={"gan": True},
                iters=1, batch_size=8, eval=False, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_options_are_checked_in_one_line():
    teacher = load_teacher("toy:checkerboard")
    cases = [({"t_min": 0.5, "t_max": 0.4}, "t_min/t_max"), ({"update_ratio": 0}, "update_ratio"),
             ({"spacing": "cubic"}, "unknown spacing"), ({"steps": 4, "regression_weight": 0.25}, "one-step"),
             ({"timesteps": [0.5, 0.9]}, "decreasing"), ({"regression_solver": "rk4"}, "regression_solver")]
    for opts, needle in cases:
        with pytest.raises(FewstepError, match=needle):
            get_method("dmd")(teacher, build_method_config("dmd", opts))
    with pytest.raises(FewstepError, match="unknown option.*sid_alpha"):
        build_method_config("dmd2", {"sid_alpha": 1.0})


FAST = dict(teacher="toy:checkerboard", batch_size=32, eval=False, sample_every=0, warmup=2, log_every=1)


def test_update_ratio_is_honoured_and_only_trained_networks_keep_optimizer_state(tmp_path):
    run = tmp_path / "run"
    distill(method="dmd2", out=str(run), iters=10, options={"update_ratio": 5}, **FAST)
    tensors, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert float(tensors["opt.fake_score.0.step"]) == 10 and float(tensors["opt.student.0.step"]) == 2
    assert set(meta["optimizers"]) == {"student", "fake_score"}  # the frozen teacher has no optimizer state
    assert not any(k.startswith("net.teacher.") for k in tensors)
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    gen_iters = [r["iteration"] for r in log if "generator/loss" in r["losses"]]
    assert gen_iters == [1, 6] and all("critic/denoise" in r["losses"] for r in log)


def test_teacher_runs_without_autograd_except_for_sid(tmp_path, monkeypatch):
    from fewstep.models.mlp import MLPNet

    teacher = load_teacher("toy:checkerboard")
    seen = []
    real_forward = MLPNet.forward

    def recording(self, *a, **k):
        if self is teacher.net:
            seen.append(torch.is_grad_enabled())
        return real_forward(self, *a, **k)

    monkeypatch.setattr(MLPNet, "forward", recording)
    distill(method="dmd2", out=str(tmp_path / "a"), iters=2, teacher_model=teacher,
            **{**FAST, "teacher": "toy:checkerboard"})
    assert seen and not any(seen)
    seen.clear()
    distill(method="sid", out=str(tmp_path / "b"), iters=2, teacher_model=teacher,
            **{**FAST, "teacher": "toy:checkerboard"})
    assert any(seen)  # SiD differentiates through the teacher's input (its weights stay frozen)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_resume_is_bit_exact_with_generator_fake_score_and_gan_head(tmp_path, resume_matches):
    resume_matches(tmp_path, method="dmd2", **{**FAST, "teacher": "digits", "batch_size": 8},
                   options={"gan": True, "update_ratio": 2, "steps": 2})


def test_multistep_student_samples_with_its_own_times(tmp_path):
    from fewstep import api

    run = tmp_path / "run"
    distill(method="dmd2", out=str(run), iters=2, options={"steps": 4, "spacing": "uniform"}, **FAST)
    res = api.sample(str(run), num=16)
    assert res["steps"] == 4 and res["solver"] == "fewstep" and res["spacing"] == "saved"
    assert res["renoise"] == "fresh"


def test_dmd_regression_uses_teacher_pairs_from_the_shared_engine_or_a_pairs_directory(tmp_path):
    from fewstep.sampling.pairs import generate_pairs, make_pairs

    teacher = load_teacher("toy:checkerboard")
    m = get_method("dmd")(teacher, build_method_config("dmd", {"regression_pairs": 64, "regression_steps": 4}))
    assert m.config.regression_weight == 0.25  # DMD's default
    nets = {k: r.module for k, r in m.networks().items()}
    ref = make_pairs(teacher, 64, steps=4, solver="heun")
    assert torch.equal(m.pairs.noise, ref.noise) and torch.equal(m.pairs.x, ref.x)
    # the regression loss is the MSE between G(z) (one step from prior noise) and the teacher's ODE output
    c1, c2 = ctx(3), ctx(3)
    loss = m.regression_loss(nets, Batch(size=16), c1)
    z, x, _ = m.pairs.sample(16, c2.generator)
    with torch.no_grad():
        out = nets["student"](z, torch.ones(16), None)
    assert float(loss.detach()) == pytest.approx(float(((out - x) ** 2).mean()), rel=1e-6)
    # the generator phase includes it
    out = m.loss("generator", Batch(size=16), nets, ctx(4))
    assert "regression" in out and float(out["regression"]) > 0 and out["loss"].requires_grad
    # pairs written by `fewstep pairs` are reused as they are
    generate_pairs(teacher, tmp_path / "pairs", 32, steps=2, solver="euler", spacing="uniform", seed=5, guidance=1.0,
                   shard_size=16, batch_size=16)
    m2 = get_method("dmd")(teacher, build_method_config("dmd", {"pairs": str(tmp_path / "pairs")}))
    m2.networks()
    assert len(m2.pairs) == 32 and torch.equal(m2.pairs.x, make_pairs(teacher, 32, steps=2, solver="euler",
                                                                       seed=5).x)
    digits = load_teacher("digits")
    with pytest.raises(FewstepError, match="shape"):
        get_method("dmd")(digits, build_method_config("dmd", {"pairs": str(tmp_path / "pairs")})).networks()
