"""sCM (sCD / sCT): the tangent on cases with known answers, warm-up, normalisation, adaptive weighting,
time sampling, the student's format, training, exact resume and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fewstep.diffusion import RectifiedFlow
from fewstep.errors import FewstepError
from fewstep.methods import Batch, StepContext, build_method_config, get_method
from fewstep.methods.scm import LogVarianceHead, normalize_tangent, scm_tangent
from fewstep.models import Denoiser
from fewstep.models.trigflow import TrigFlowDenoiser
from fewstep.teachers import load_teacher
from fewstep.training import distill

F64 = torch.float64
C = 0.7  # data std
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class GaussianFlowNet(nn.Module):
    """Rectified-flow velocity networks for Gaussian data N(0, C^2 I) in closed form.

    teacher: the exact ODE velocity eps_hat - x0_hat. consistency: the velocity whose x0 = x_s - s v is the
    exact consistency function of that ODE, f(x_s, s) = x_s C / k(s) with k(s) = sqrt((1 - s)^2 C^2 + s^2)
    (the ODE only rescales: x_s = x_0 k(s) / C).
    """

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.dummy = nn.Parameter(torch.zeros((), dtype=F64))  # something for an optimizer to hold

    def forward(self, x, s, cond=None):
        s = s.to(F64)[:, None]
        a, sig = 1 - s, s
        k2 = a * a * C * C + sig * sig
        if self.kind == "teacher":
            return (sig / k2) * x - (a * C * C / k2) * x + 0 * self.dummy
        f = x * C / torch.sqrt(k2)
        return (x - f) / s + 0 * self.dummy


def _den(kind):
    return Denoiser(GaussianFlowNet(kind), RectifiedFlow(), "flow", data_shape=(3,))


def _ctx(iteration=0, seed=0):
    return StepContext(iteration=iteration, generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"))


def _state(n=64, sigma_d=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = C * torch.randn(n, 3, dtype=F64, generator=g)
    eps = torch.randn(n, 3, dtype=F64, generator=g)
    t = torch.rand(n, dtype=F64, generator=g) * 1.5 + 0.03
    x_t = torch.cos(t)[:, None] * x0 + sigma_d * torch.sin(t)[:, None] * eps
    return x0, eps, t, x_t


def _method(teacher, **opts):
    return get_method("scm")(teacher, build_method_config("scm", {"jvp": "func", **opts}))


@pytest.mark.parametrize("sigma_d", [0.5, 1.0])
def test_exact_consistency_function_has_zero_tangent(sigma_d):
    teacher, student = _den("teacher"), _den("consistency")
    method = _method(teacher, sigma_d=sigma_d)
    nets = {"teacher": teacher, "student": student}
    x0, eps, t, x_t = _state(sigma_d=sigma_d)
    with torch.no_grad():
        dx_dt = method.velocity(x_t, t, x0, eps, None, nets)
    _, g = method.tangent(x_t, t, dx_dt, None, nets, r=1.0)
    assert float(g.abs().max()) < 1e-10
    # the teacher itself is not a consistency function: its x0 estimate moves along its own ODE
    _, g_teacher = method.tangent(x_t, t, dx_dt, None, {"teacher": teacher, "student": teacher}, r=1.0)
    assert float(g_teacher.abs().max()) > 1e-2
    # the exact loss is zero too (no tangent, nothing to learn), at any warm-up stage once r = 1
    out = method.scm_loss(Batch(size=64, x0=x0), {**nets, "weighting": LogVarianceHead()}, _ctx(iteration=10 ** 6))
    assert float(out["tangent_rms"]) < 1e-10 and float(out["mse"]) < 1e-18


@pytest.mark.parametrize("teacher_name", ["toy:checkerboard", "digits"])
def test_tangent_is_cos_t_times_the_autograd_derivative_of_the_consistency_function(teacher_name):
    """With r = 1, g = cos(t) d/dt f^-(x_t, t) along the teacher's ODE; the reference derivative is assembled
    from the full Jacobians of f computed by reverse-mode autograd (one backward pass per output element)."""
    teacher = load_teacher(teacher_name).double()
    method = _method(teacher, sigma_d=0.5)
    student = method.student_from_teacher()
    with torch.no_grad():  # a student that differs from the teacher
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=F64))
    nets = {"teacher": teacher, "student": student}
    n = 2
    g0 = torch.Generator().manual_seed(1)
    shape = (n, *teacher.data_shape)
    x0, eps = torch.randn(shape, dtype=F64, generator=g0), torch.randn(shape, dtype=F64, generator=g0)
    t = torch.tensor([0.3, 1.2], dtype=F64)
    cond = torch.tensor([3, 7]) if teacher.conditional else None
    col = (-1, *[1] * (x0.ndim - 1))
    x_t = torch.cos(t).reshape(col) * x0 + 0.5 * torch.sin(t).reshape(col) * eps
    with torch.no_grad():
        dx_dt = method.velocity(x_t, t, x0, eps, cond, nets)
    F, g = method.tangent(x_t, t, dx_dt, cond, nets, r=1.0)
    wrapper = TrigFlowDenoiser(student, 0.5)
    jx, jt = torch.autograd.functional.jacobian(lambda a, b: wrapper.x0(a, b, cond), (x_t, t))
    d = x_t[0].numel()
    jx = jx.reshape(n, d, n, d)
    df_dt = torch.stack([jx[i, :, i] @ dx_dt[i].flatten() + jt.reshape(n, d, n)[i, :, i] for i in range(n)])
    expected = torch.cos(t)[:, None] * df_dt
    torch.testing.assert_close(g.flatten(1), expected, rtol=1e-8, atol=1e-8 * float(expected.abs().max()))
    # the warm-up scales the second term only
    _, g_half = method.tangent(x_t, t, dx_dt, cond, nets, r=0.5)
    first = scm_tangent(F.detach(), torch.zeros_like(F), torch.zeros_like(x_t), dx_dt, t, 0.5, r=0.0)
    torch.testing.assert_close(g_half, 0.5 * (g + first), rtol=1e-9, atol=1e-9)


def test_jvp_backends_give_the_same_tangent_up_to_the_ends_of_the_time_range():
    """The method's tangent with forward AD (kernel, func) and with central differences agree in fp64 on the digits
    UNet, also at t = 0 and t = pi/2, where the difference steps are one-sided so as not to leave the range."""
    teacher = load_teacher("digits").double()
    methods = {b: _method(teacher, sigma_d=0.5, jvp=b) for b in ("kernel", "func", "fd")}
    student = methods["fd"].student_from_teacher()
    nets = {"teacher": teacher, "student": student}
    g0 = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 1, 8, 8, dtype=F64, generator=g0), torch.randn(4, 1, 8, 8, dtype=F64, generator=g0)
    t = torch.tensor([0.0, 0.7, 1.3, math.pi / 2], dtype=F64)
    cond = torch.tensor([0, 4, 6, 9])
    x_t = torch.cos(t)[:, None, None, None] * x0 + 0.5 * torch.sin(t)[:, None, None, None] * eps
    with torch.no_grad():
        dx_dt = methods["fd"].velocity(x_t, t, x0, eps, cond, nets)
    gs = {b: m.tangent(x_t, t, dx_dt, cond, nets, r=1.0)[1] for b, m in methods.items()}
    scale = float(gs["kernel"].abs().max())
    torch.testing.assert_close(gs["func"], gs["kernel"], rtol=1e-10, atol=1e-10 * scale)
    torch.testing.assert_close(gs["fd"], gs["kernel"], rtol=1e-5, atol=1e-5 * scale)
    h_plus, h_minus = methods["fd"].fd_steps(t, F64)
    assert h_plus.tolist() == [1e-6, 1e-6, 1e-6, 0.0] and h_minus.tolist() == [0.0, 1e-6, 1e-6, 1e-6]


def test_sct_velocity_is_the_noising_path_derivative():
    method = _method(_den("teacher"), mode="train", sigma_d=0.5)
    x0, eps, t, x_t = _state()
    v = method.velocity(x_t, t, x0, eps, None, {})
    h = 1e-6
    path = lambda s: torch.cos(s)[:, None] * x0 + 0.5 * torch.sin(s)[:, None] * eps  # noqa: E731
    torch.testing.assert_close(v, (path(t + h) - path(t - h)) / (2 * h), rtol=1e-7, atol=1e-8)
    assert set(method.networks()) == {"student", "weighting"}  # sCT never calls a teacher


def test_tangent_normalisation_and_warmup():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=F64)
    expected = torch.tensor([[3 / 5.1, 4 / 5.1], [0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(normalize_tangent(g, "l2", 0.1), expected)
    rms = 5 / math.sqrt(2)
    torch.testing.assert_close(normalize_tangent(g, "rms", 0.1), g / (rms + 0.1))
    assert torch.equal(normalize_tangent(g, "none"), g)
    method = _method(_den("teacher"), tangent_warmup=100)
    assert [method.tangent_warmup(i) for i in (0, 50, 100, 1000)] == [0.0, 0.5, 1.0, 1.0]
    assert _method(_den("teacher"), tangent_warmup=0).tangent_warmup(0) == 1.0


def test_adaptive_weighting_learns_the_log_of_the_loss_scale():
    """loss = exp(-u(t)) m(t) + u(t) is minimised at u = log m(t): the head ends up normalising the loss over t."""
    torch.manual_seed(0)
    head = LogVarianceHead()
    assert float(head(torch.rand(8, dtype=F64)).detach().abs().max()) == 0.0  # weight 1 at the start
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(400):
        t = torch.rand(256, dtype=F64) * math.pi / 2
        m = 0.01 + t ** 2
        loss = (torch.exp(-head(t)) * m + head(t)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    t = torch.linspace(0.2, 1.5, 9, dtype=F64)
    torch.testing.assert_close(head(t).double(), torch.log(0.01 + t ** 2), atol=0.15, rtol=0)


def test_time_sampling_is_lognormal_in_sigma_and_inside_the_range():
    method = _method(load_teacher("toy:checkerboard"), sigma_d=0.5, p_mean=-1.0, p_std=1.4)
    t = method.sample_time(20000, _ctx())
    assert t.dtype == F64 and bool(((t >= 0) & (t <= math.pi / 2)).all())
    log_sigma = torch.log(0.5 * torch.tan(t))
    assert abs(float(log_sigma.mean()) + 1.0) < 0.05 and abs(float(log_sigma.std()) - 1.4) < 0.05
    logit = _method(load_teacher("toy:checkerboard"), time_dist="logit_normal", sigma_d=0.5, p_mean=0.3, p_std=1.0)
    r = 0.5 * torch.tan(logit.sample_time(20000, _ctx()))
    logit_s = torch.logit(r / (1 + r))  # flow time s = r / (1 + r)
    assert abs(float(logit_s.mean()) - 0.3) < 0.05 and abs(float(logit_s.std()) - 1.0) < 0.05


def test_loss_is_differentiable_for_both_roles_and_logs_what_it_should():
    teacher = load_teacher("digits")
    method = _method(teacher, tangent_warmup=10)
    roles = method.networks()
    assert set(roles) == {"teacher", "student", "weighting"}
    assert roles["student"].trainable and roles["weighting"].trainable and not roles["teacher"].trainable
    assert [p.trains for p in method.phases()] == [("student", "weighting")]
    nets = {k: r.module for k, r in roles.items()}
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    out = method.loss("student", Batch(size=6, x0=x0, cond=torch.arange(6)), nets, _ctx(iteration=5))
    assert float(out["r"]) == 0.5 and float(out["logvar"]) == 0.0
    assert float(out["loss"].detach()) == pytest.approx(float(out["mse"]), rel=1e-6)  # u = 0: loss = mse + 0
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["student"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["weighting"].parameters())
    assert all(p.grad is None for p in nets["teacher"].parameters())
    fixed = _method(teacher, weighting="fixed", weight_scale=100.0)
    assert set(fixed.networks()) == {"teacher", "student"} and [p.trains for p in fixed.phases()] == [("student",)]
    nets = {k: r.module for k, r in fixed.networks().items()}
    out = fixed.loss("student", Batch(size=6, x0=x0, cond=torch.arange(6)), nets, _ctx(iteration=5))
    assert float(out["loss"].detach()) == pytest.approx(100 * float(out["mse"]), rel=1e-6)


def test_bad_options_are_one_line_errors():
    teacher = load_teacher("toy:checkerboard")
    for opts, needle in (({"mode": "both"}, "unknown mode"), ({"jvp": "magic"}, "unknown jvp"),
                         ({"time_dist": "uniform"}, "unknown time_dist"), ({"sigma_d": 0}, "sigma_d"),
                         ({"weighting": "x"}, "unknown weighting"), ({"tangent_norm": "l1"}, "unknown tangent_norm"),
                         ({"fd_step": -1.0}, "fd_step"), ({"tangent_warmup": -1}, "tangent_warmup")):
        with pytest.raises(FewstepError, match=needle):
            _method(teacher, **opts)


FAST = dict(method="scm", teacher="toy:checkerboard", batch_size=32, eval=False, sample_every=0, warmup=2,
            log_every=1)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_resume_is_bit_exact_with_the_weighting_head(tmp_path):
    kw = {**FAST, "options": {"tangent_warmup": 4}}
    full, split = tmp_path / "full", tmp_path / "split"
    distill(out=str(full), iters=6, checkpoint_every=0, **kw)
    distill(out=str(split), iters=6, checkpoint_every=0, stop_after=2, **kw)
    distill(out=str(split), resume=True, stop_after=1)
    distill(out=str(split), resume=True)
    for sub in ("student/model.safetensors", "student_online/model.safetensors"):
        a, b = _weights(full / sub), _weights(split / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    ca, cb = (_weights(run / "checkpoints" / "step_00000006" / "state.safetensors") for run in (full, split))
    heads = [k for k in ca if k.startswith("net.weighting.")]
    assert heads and all(torch.equal(ca[k], cb[k]) for k in heads)
    first = _weights(full / "student_online/model.safetensors")
    teacher = load_teacher("toy:checkerboard").net.state_dict()
    assert any(not torch.equal(first[k], teacher[k]) for k in teacher)


def test_resume_is_bit_exact_sct_on_digits(tmp_path):
    kw = dict(method="scm", teacher="digits", batch_size=8, eval=False, sample_every=0, warmup=2, log_every=1,
              options={"mode": "train", "weighting": "fixed"})
    full, split = tmp_path / "full", tmp_path / "split"
    distill(out=str(full), iters=4, checkpoint_every=0, **kw)
    distill(out=str(split), iters=4, checkpoint_every=0, stop_after=2, **kw)
    distill(out=str(split), resume=True)
    a, b = _weights(full / "student_online/model.safetensors"), _weights(split / "student_online/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_student_is_a_denoiser_in_the_teachers_process_that_the_sampler_loads(tmp_path):
    import fewstep

    run = tmp_path / "run"
    distill(out=str(run), iters=3, checkpoint_every=0, **FAST)
    cfg = json.loads((run / "student" / "config.json").read_text())
    assert cfg["denoiser"]["process"] == {"type": "flow"} and cfg["denoiser"]["prediction"] == "flow"
    assert cfg["meta"]["method"] == "scm" and cfg["meta"]["default_solver"] == "fewstep"
    res = fewstep.sample(str(run), num=16, steps=2, out=str(tmp_path / "s.npz"))
    assert res["solver"] == "fewstep" and res["_samples"].shape == (16, 2)


def _consistency_gap(student, teacher, x0, sigma_d, times=(0.2, 0.5, 0.8, 1.1), delta=0.05):
    """mean_t ||f(x_t, t) - f(x_{t - delta}, t - delta)|| / delta with x_{t - delta} one Heun step of the teacher's
    ODE from x_t: the discrete consistency loss (Song et al. 2023), a measure that ignores wiggles faster than delta."""
    from fewstep.sampling import ode_solve

    view = TrigFlowDenoiser(teacher, sigma_d)
    gaps = []
    for i, tv in enumerate(times):
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(i))
        x_t = math.cos(tv) * x0 + sigma_d * math.sin(tv) * eps
        x_s, s = view.native(x_t, torch.full((x0.shape[0],), tv, dtype=F64))
        s2 = view.native(x_t, torch.full((x0.shape[0],), tv - delta, dtype=F64))[1]
        with torch.no_grad():
            x_s2 = ode_solve(teacher, x_s, [float(s[0]), float(s2[0])], solver="heun")
            gap = student(x_s, s.float()) - student(x_s2, s2.float())
        gaps.append(float(gap.pow(2).sum(1).mean().sqrt()) / delta)
    return sum(gaps) / len(gaps)


def test_consistency_gap_shrinks_on_a_short_run(tmp_path):
    """A short sCD run makes the student markedly more consistent along the teacher's ODE than the teacher it starts
    from (the online weights after 200 iterations: about 1.22 -> 0.49)."""
    from fewstep.api import load_model
    from fewstep.data import get_data

    run = tmp_path / "run"
    distill(out=str(run), method="scm", teacher="toy:checkerboard", iters=200, batch_size=128, lr=2e-4, ema="none",
            eval=False, sample_every=0, checkpoint_every=0, options={"tangent_warmup": 50})
    teacher = load_teacher("toy:checkerboard")
    x0, _ = get_data("toy:checkerboard").sample(1024, torch.Generator().manual_seed(5))
    before = _consistency_gap(teacher, teacher, x0, 1.0)
    after = _consistency_gap(load_model(str(run / "student")), teacher, x0, 1.0)
    assert after < 0.6 * before, (before, after)


def test_cli_mode_flag(tmp_path):
    from typer.testing import CliRunner

    from fewstep.cli import app

    res = CliRunner().invoke(app, ["distill", "--method", "scm", "--mode", "train", "--iters", "2", "--batch-size",
                                   "16", "--no-eval", "--sample-every", "0", "--out", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.output
    import yaml

    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["options"]["mode"] == "train"
    res = CliRunner().invoke(app, ["distill", "--method", "cd", "--mode", "train", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "unknown option(s) mode for method 'cd'" in res.output
    assert not (tmp_path / "c").exists()


def test_bf16_mixed_precision_keeps_forward_mode_ad(tmp_path, monkeypatch):
    """accelerate wraps the student's forward in autocast; the JVP runs outside it (torch's forward AD mis-casts
    tangents under autocast) with the student cast to bf16 for the pass, so auto still picks forward-mode AD
    rather than falling back to differences."""
    import warnings

    from fewstep.methods.scm import ContinuousConsistency

    chosen = []
    original = ContinuousConsistency.tangent

    def spy(self, *a, **k):
        out = original(self, *a, **k)
        chosen.append(self.jvp.chosen)
        return out

    monkeypatch.setattr(ContinuousConsistency, "tangent", spy)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*finite differences.*")
        res = distill(method="scm", teacher="digits", iters=2, batch_size=8, mixed_precision="bf16", eval=False,
                      sample_every=0, out=str(tmp_path / "r"))
    assert res["finished"] and chosen == ["kernel", "kernel"] and res["jvp_dtype"] == "bfloat16"
