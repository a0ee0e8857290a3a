"""TDM: the student's deterministic path, the re-noise/diffuse step and its importance weight, both losses,
steps-aware grids saved with the student, resume."""

from __future__ import annotations

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.methods import Batch, StepContext, build_method_config, get_method
from fewstep.sampling import sample_fewstep
from fewstep.teachers import load_teacher
from fewstep.training import distill

FAST = dict(teacher="toy:checkerboard", batch_size=32, eval=False, sample_every=0, warmup=2, log_every=1)


def ctx(seed=0):
    return StepContext(iteration=0, generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"))


def tdm(teacher="toy:checkerboard", **opts):
    t = load_teacher(teacher) if isinstance(teacher, str) else teacher
    return get_method("tdm")(t, build_method_config("tdm", opts))


def test_defaults_follow_the_paper():
    m = tdm()
    c = m.config
    assert len(m.gen_times) == 4 and m.gen_times.tolist() == [1.0, 0.75, 0.5, 0.25]
    assert c.fake_lr_scale == 5.0 and (c.student_beta1, c.critic_beta1, c.beta2) == (0.0, 0.0, 0.95)
    assert c.huber_c == 1e-3 and c.snr_cap == 5.0 and c.update_ratio == 1
    roles = m.networks()
    assert roles["fake_score"].lr_scale == 5.0 and roles["student"].betas == (0.0, 0.95)
    assert not roles["teacher"].trainable
    # TDM-unify: the student and the fake score take the step count as an input; the teacher does not
    assert c.steps_aware and c.steps_embed is None and m.embed_steps and c.fake_target == "x0" and c.interval == "step"
    assert roles["student"].module.steps_embedded and roles["fake_score"].module.steps_embedded
    assert not roles["teacher"].module.steps_embedded
    meta = m.student_meta()
    assert meta["default_renoise"] == "deterministic" and meta["default_steps"] == 4
    assert set(meta["timesteps"]) == {"1", "2", "3", "4"} and meta["timesteps"]["2"] == [1.0, 0.5]
    assert meta["timesteps"]["3"] == pytest.approx([1.0, 2 / 3, 1 / 3])


def test_trajectory_points_lie_on_the_students_deterministic_sampling_path():
    """The state at step k of the rollout is the state `fewstep sample` (fewstep sampler, deterministic
    re-noise = DDIM) reaches at step k from the same noise."""
    teacher = load_teacher("toy:checkerboard")
    m = tdm(teacher, steps_aware=False)
    student = m.networks()["student"].module.eval()
    c1, c2 = ctx(4), ctx(4)
    x_k, t_k, t_low, steps = m.trajectory_point(student, Batch(size=64), c1)
    assert steps is None  # a 4-step-only student takes no step count
    noise = c2.randn((64, 2))  # the same draws as inside trajectory_point: noise, then the steps
    k = (c2.rand(64) * 4).long()
    with torch.no_grad():
        path = sample_fewstep(student, noise, m.gen_times, renoise="deterministic", capture=True)
    expected = path.xs[k, torch.arange(64)]
    assert torch.allclose(x_k, expected, atol=1e-5)
    assert torch.equal(t_k, m.gen_times[k])
    grid = m.gen_times.tolist() + [0.0]
    assert t_low.tolist() == [grid[int(i) + 1] for i in k]


def test_diffuse_keeps_the_marginal_and_weights_non_gaussian_noise_down():
    """x_t = alpha_t x0_s + sigma_t m with m the mixed noise; when the student's implied eps is Gaussian,
    m is unit Gaussian and (in many dimensions) the importance weight is ~1; a too-large eps is weighted down."""
    m = tdm(steps_aware=False)
    proc = m.teacher.process
    b, d = 256, 1024
    x0 = torch.randn(b, d, generator=torch.Generator().manual_seed(0))
    t_k = torch.full((b,), 0.75, dtype=torch.float64)
    t_low = torch.full((b,), 0.5, dtype=torch.float64)
    weights = {}
    for scale in (1.0, 3.0):
        eps_s = scale * torch.randn(b, d, generator=torch.Generator().manual_seed(1))
        x_k = float(proc.alpha(t_k[0])) * x0 + float(proc.sigma(t_k[0])) * eps_s
        d_ = m.diffuse(x0, x_k, t_k, t_low, ctx(2))  # the same t and fresh noise for both
        x_t, t, weights[scale] = d_["x_t"], d_["t"], d_["weight"]
        assert torch.all((t > 0.5) & (t < 0.75))  # inside (t_mid, t_k)
        if scale == 1.0:
            noise = (x_t - (1 - t)[:, None] * x0) / t[:, None]
            assert abs(float(noise.std()) - 1) < 0.05
    assert abs(float(weights[1.0].mean()) - 1) < 0.05
    assert torch.all(weights[3.0] < 0.7 * weights[1.0])
    # the last step's interval reaches clean data: x_mid = x0_s, then plain forward noising
    d_ = m.diffuse(x0, x0 * 0.75 + 0.25 * torch.randn(b, d), torch.full((b,), 0.25, dtype=torch.float64),
                   torch.zeros(b, dtype=torch.float64), ctx(3))
    t, w = d_["t"], d_["weight"]
    assert torch.all((t >= 0.01) & (t < 0.25)) and torch.allclose(w, torch.ones(b), atol=1e-6)


def _fitted_fake_slope(target, t_val, c=0.25, b=200_000):
    """1-D Gaussian first step (t_k = 1, t_mid = 0.75): x0_s = c z is fully coupled with the student's noise
    eps_s = z. Fit a linear fake score x0_fake = w x_t by minimising the fake-score loss of `target` at one
    time t, and return the implied score slope (alpha_t w - 1) / sigma_t^2 with the true one, -1 / Var(x_t)."""
    m = tdm(steps_aware=False, fake_target=target)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b, 1, generator=g)
    x0_s = c * z  # the student input at t = 1 is z itself, so its implied eps is z
    t = torch.full((b,), t_val, dtype=torch.float64)
    a_t, s_t, a_m, s_m = 1 - t_val, t_val, 0.25, 0.75
    x_mid = a_m * x0_s + s_m * z
    ratio = a_t / a_m
    beta = (s_t ** 2 - (ratio * s_m) ** 2) ** 0.5
    x_t = ratio * x_mid + beta * torch.randn(b, 1, generator=g)
    col = torch.ones(b, dtype=torch.float64)
    d = {"x_t": x_t, "t": t.float(), "weight": torch.ones(b), "x_mid": x_mid, "ratio": ratio * col,
         "beta": beta * col, "alpha_t": a_t * col, "sigma_t": s_t * col}
    w = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = m.fake_score_loss(w * x_t, x0_s, d).mean()
        loss.backward()
        return loss

    opt.step(closure)
    var = float(((ratio * x_mid) ** 2).mean() + beta ** 2)
    return (a_t * float(w.detach()) - 1) / s_t ** 2, -1 / var


def test_state_target_gives_the_exact_score_where_the_x0_target_is_biased():
    """TDM's x0 regression reads E[x0_s | x_t] as a score as if x_t were x0_s plus independent Gaussian noise;
    on an intermediate step the student's re-noise couples the two, so the learnt score is off. Denoising
    score matching on the fresh-noise kernel ("state") gives the exact score of the diffused states."""
    for c in (0.25, 0.5):
        got, true = _fitted_fake_slope("state", 0.8, c=c)
        assert got == pytest.approx(true, rel=0.01)
        # x0: the fake looks narrower than the student's states are (4.7% and 9.4% steeper), so the generator
        # is pushed to spread them too far
        biased, _ = _fitted_fake_slope("x0", 0.8, c=c)
        assert biased < 1.03 * true


def test_fake_score_weight_is_min_snr_5():
    m = tdm()
    t = torch.tensor([0.05, 0.5, 0.95])
    snr = ((1 - t) / t) ** 2
    assert torch.allclose(m.snr_weight(t), torch.minimum(snr, torch.tensor(5.0)), rtol=1e-5)


def test_generator_moves_x0_toward_the_guided_teacher_and_away_from_the_fake():
    """The generator's update -dL/dx0_s has the sign of x0_teacher_cfg - x0_fake element by element."""
    teacher = load_teacher("digits")
    m = get_method("tdm")(teacher, build_method_config("tdm", {"steps_aware": False}), guidance=2.0)
    roles = m.networks()
    nets = {k: r.module for k, r in roles.items()}
    torch.nn.init.normal_(nets["fake_score"].net.conv_out.weight, std=0.05)  # a fake score unlike the teacher
    x0_s = torch.randn(8, 1, 8, 8, requires_grad=True)
    cond = torch.arange(8)
    gaps = {}
    orig = m.real_minus_fake

    def spy(nets_, x_t, t, cond_, steps=None):
        gap, real = orig(nets_, x_t, t, cond_, steps=steps)
        gaps["gap"] = gap
        # the real score is the teacher guided at w = 2: cond + (w - 1)(cond - uncond)
        with torch.no_grad():
            c_, u_ = teacher(x_t, t, cond_), teacher(x_t, t, None)
        assert torch.allclose(real, c_ + (c_ - u_), atol=1e-5)
        return gap, real

    m.real_minus_fake = spy

    class Fixed(torch.nn.Module):
        def forward(self, x, t, cond=None, guidance=1.0, steps=None):  # the rollout calls it on fewer rows
            return x0_s if x.shape[0] == 8 else x0_s[:x.shape[0]].detach()

    nets["student"] = Fixed()
    out = m.loss("generator", Batch(size=8, cond=cond), nets, ctx(1))
    out["loss"].backward()
    update, gap = -x0_s.grad, gaps["gap"]
    big = gap.abs() > 1e-2
    assert torch.all(torch.sign(update[big]) == torch.sign(gap[big]))


def test_steps_aware_training_uses_every_step_count():
    m = tdm()
    student = m.networks()["student"].module
    seen = set()
    c = ctx(0)
    for _ in range(10):
        x_k, t_k, t_low, steps = m.trajectory_point(student, Batch(size=16), c)
        # each sample's interval is one of its own step count's grid: length 1 / n
        assert torch.allclose((t_k - t_low).float(), 1.0 / steps.float(), atol=1e-6)
        seen.update(steps.tolist())
    assert seen == {1, 2, 3, 4}
    with pytest.raises(FewstepError, match="steps_aware=false"):
        tdm(timesteps=[1.0, 0.5])
    with pytest.raises(FewstepError, match="unknown interval"):
        tdm(interval="all")


def test_student_samples_deterministically_on_its_saved_grids(tmp_path):
    from fewstep import api

    run = tmp_path / "run"
    distill(method="tdm", out=str(run), iters=3, **FAST)
    from fewstep.sampling import sampler_settings

    student = api.load_model(run)
    assert student.steps_embedded  # the reloaded student keeps its step-count input
    for steps, grid in ((4, [1.0, 0.75, 0.5, 0.25]), (2, [1.0, 0.5]), (1, [1.0])):
        assert sampler_settings(student, steps=steps).timesteps.tolist() == grid
        a = api.sample(str(run), num=32, steps=steps, seed=1)
        assert a["renoise"] == "deterministic" and a["spacing"] == "saved"
        b = api.sample(str(run), num=32, steps=steps, seed=1)
        assert torch.equal(a["_samples"], b["_samples"])  # deterministic given the seed
    res = api.sample(str(run), num=8)
    assert res["steps"] == 4


def test_resume_is_bit_exact(tmp_path, resume_matches):
    resume_matches(tmp_path, method="tdm", **FAST)


def test_steps_aware_points_lie_on_each_step_counts_own_path():
    """With steps_aware, a sample with step count n sits at step k of the n-step deterministic path that
    `fewstep sample --steps n` takes (its own saved grid, the student told n)."""
    m = tdm()
    student = m.networks()["student"].module.eval()
    torch.nn.init.normal_(student.net.embed.steps_mlp[2].weight, std=0.3)  # step counts change the output
    x_k, t_k, t_low, steps = m.trajectory_point(student, Batch(size=64), ctx(5))
    g = ctx(5)
    g.rand(64)  # the step counts
    noise = g.randn((64, 2))
    k = (g.rand(64) * steps).long()
    for n in (1, 2, 3, 4):
        sel = steps == n
        with torch.no_grad():
            path = sample_fewstep(student, noise[sel], m.grids[n], renoise="deterministic", capture=True)
        assert torch.allclose(x_k[sel], path.xs[k[sel], torch.arange(int(sel.sum()))], atol=1e-5)
        grid = m.grids[n].tolist() + [0.0]
        assert t_k[sel].tolist() == [grid[i] for i in k[sel]] and t_low[sel].tolist() == [grid[i + 1] for i in k[sel]]


def test_rollout_moves_only_the_samples_still_ahead_and_keeps_their_conditions():
    """The rollout evaluates the student only on samples whose step k is still ahead; with class labels each
    sample keeps its own label (its state is the labelled sampler's at step k)."""
    from fewstep.models.denoiser import select_conds

    teacher = load_teacher("digits")
    m = tdm(teacher, steps_aware=False)
    student = m.networks()["student"].module.eval()
    labels = torch.arange(12) % 10
    calls = []
    net_forward = student.net.forward

    def spy(x, t, *a, **kw):
        calls.append(x.shape[0])
        return net_forward(x, t, *a, **kw)

    student.net.forward = spy
    x_k, t_k, _, _ = m.trajectory_point(student, Batch(size=12, cond=labels), ctx(2))
    student.net.forward = net_forward
    g = ctx(2)
    noise = g.randn((12, *teacher.data_shape))
    k = (g.rand(12) * 4).long()
    assert calls == [int((k > j).sum()) for j in range(int(k.max()))]  # not the whole batch every step
    with torch.no_grad():
        path = sample_fewstep(student, noise, m.gen_times, cond=labels, renoise="deterministic", capture=True)
    assert torch.allclose(x_k, path.xs[k, torch.arange(12)], atol=1e-4)
    idx = torch.tensor([2, 0])
    assert select_conds(None, idx) is None and select_conds(labels, idx).tolist() == [2, 0]
    picked = select_conds({"a": labels, "b": labels * 2}, idx)
    assert picked["a"].tolist() == [2, 0] and picked["b"].tolist() == [4, 0]


def test_step_weights_choose_the_step_counts():
    m = tdm(step_weights=[0, 0, 1, 3])
    student = m.networks()["student"].module
    _, _, _, steps = m.trajectory_point(student, Batch(size=400), ctx(0))
    counts = torch.bincount(steps, minlength=5).tolist()
    assert counts[1] == counts[2] == 0 and 60 < counts[3] < 140 and counts[3] + counts[4] == 400
    with pytest.raises(FewstepError, match="step_weights needs 4"):
        tdm(step_weights=[1, 1])
    assert not tdm(steps_embed=False).networks()["student"].module.steps_embedded
    # "linear": in proportion to the step count (each (step count, step) pair equally often)
    assert torch.allclose(tdm(step_weights="linear").count_cdf, torch.tensor([0.1, 0.3, 0.6, 1.0], dtype=torch.float64))
    with pytest.raises(FewstepError, match="uniform, linear, full:W or a list"):
        tdm(step_weights="cubic")
    # "full:W": the K-step grid W times as often as each smaller count, for any K
    assert torch.allclose(tdm(step_weights="full:9").count_cdf, torch.tensor([1, 2, 3, 12], dtype=torch.float64) / 12)
    assert torch.allclose(tdm(step_weights="full:3", steps=2).count_cdf, torch.tensor([0.25, 1.0], dtype=torch.float64))
    for bad in ("full:0", "full:x", "full:inf", "full:-1"):
        with pytest.raises(FewstepError, match="full:W needs a positive number"):
            tdm(step_weights=bad)
    # a zero weight is never drawn
    _, _, _, steps = tdm(step_weights=[1, 0, 0, 0]).trajectory_point(student, Batch(size=200), ctx(3))
    assert set(steps.tolist()) == {1}


def test_the_image_recipe_works_with_any_step_count(tmp_path):
    """The digits recipe's step weights follow the step count the user asks for."""
    for opts in ({"steps": 2}, {"steps_aware": False}, {"timesteps": [999.0, 499.0], "steps_aware": False}):
        res = distill(method="tdm", teacher="digits", out=str(tmp_path / f"run{len(list(tmp_path.iterdir()))}"),
                      iters=1, batch_size=4, eval=False, sample_every=0, warmup=1, options=opts)
        assert res["finished"]


def test_fake_score_is_told_the_step_count():
    """The fake score sees the sample's step count (its distribution at a time differs between step counts)."""
    m = tdm()
    roles = m.networks()
    nets = {k: r.module for k, r in roles.items()}

    def record_steps(module):  # the step counts each call of the module is given
        seen, orig = [], module.forward

        def spy(x, t, cond=None, guidance=1.0, kind="x0", steps=None):
            seen.append(steps)
            return orig(x, t, cond, guidance, kind=kind, steps=steps)

        module.forward = spy
        return seen

    calls, student_calls = record_steps(nets["fake_score"]), record_steps(nets["student"])
    for phase in ("critic", "generator"):
        m.loss(phase, Batch(size=32), nets, ctx(1))
    assert len(calls) == 2 and all(s is not None and s.shape == (32,) for s in calls)
    assert set(calls[0].tolist()) <= {1, 2, 3, 4} and len(set(calls[0].tolist())) > 1
    # the student is told the same step counts, in its rollout (only the samples still moving) and in the call
    # that is trained
    assert student_calls and all(s is not None and 0 < s.shape[0] <= 32 for s in student_calls)
    assert student_calls[-1].shape == (32,) and torch.equal(student_calls[-1], calls[-1])
    assert set(student_calls[0].tolist()) <= {2, 3, 4}  # a 1-step sample is never rolled forward


def test_diffusers_students_go_without_the_step_count_input(tmp_path):
    """Stock diffusers pipelines cannot pass a step count, so by default a diffusers teacher's TDM student has
    no such input (it still trains every step count's grid); asking for one is a one-line error."""
    from fewstep.teachers.random_pipelines import save_random_pipeline

    teacher = load_teacher(str(save_random_pipeline("sdxl", tmp_path / "sdxl")))
    m = tdm(teacher)
    assert not m.embed_steps and m.counts == [1, 2, 3, 4]
    with pytest.raises(FewstepError, match="steps_embed needs a built-in network family"):
        tdm(teacher, steps_embed=True)


def test_resuming_a_run_from_before_the_step_count_input_says_how(tmp_path):
    """A checkpoint whose networks lack the step-count input (a TDM run from before it) does not fit the
    default networks: one line naming the keys and the option that resumes it."""
    import yaml

    run = tmp_path / "run"
    distill(method="tdm", out=str(run), iters=4, stop_after=2, checkpoint_every=2,
            options={"steps_embed": False}, **FAST)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["options"].pop("steps_embed")  # as written by the version without the option
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(FewstepError, match=r"does not fit this run's 'student' network: missing \[.*steps_mlp.*"
                                           r"add `steps_embed: false` under options"):
        distill(out=str(run), resume=True)
    cfg["options"]["steps_embed"] = False  # what the message says
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert distill(out=str(run), resume=True)["finished"]
