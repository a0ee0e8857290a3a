"""ODE solvers of the sampler engine: convergence orders, agreement with diffusers, any process, CFG, capture."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewstep.diffusion import (
    EDM,
    RectifiedFlow,
    TrigFlow,
    VPDiscrete,
    convert_state,
    convert_time,
    from_x0,
    sampling_timesteps,
)
from fewstep.errors import FewstepError
from fewstep.models import Denoiser
from fewstep.sampling import ODE_SOLVERS, SOLVERS, flow_scale, flow_time, sample

F64 = torch.float64


class SmoothNet(nn.Module):
    """A fixed, smooth random network (one tanh layer) of (x, t), optionally class-conditional."""

    def __init__(self, dim=2, hidden=32, time_scale=1.0, num_classes=None, dtype=F64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w1", torch.randn(dim + 1, hidden, generator=g, dtype=dtype) / math.sqrt(dim + 1))
        self.register_buffer("w2", torch.randn(hidden, dim, generator=g, dtype=dtype) / math.sqrt(hidden))
        self.register_buffer("emb", torch.randn((num_classes or 0) + 1, hidden, generator=g, dtype=dtype))
        self.time_scale = time_scale

    def forward(self, x, t, cond=None):
        h = torch.cat([x, (t * self.time_scale)[:, None].to(x.dtype)], dim=1) @ self.w1
        if cond is not None:
            h = h + self.emb[cond]
        return torch.tanh(h) @ self.w2


def flow_model(**kw):
    return Denoiser(SmoothNet(**kw), RectifiedFlow(), "flow", data_shape=(2,))


def vp_model(process=None, prediction="eps"):
    process = process or VPDiscrete.from_schedule("scaled_linear")
    return Denoiser(SmoothNet(time_scale=1e-3), process, prediction, data_shape=(2,))


NOISE = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=F64)


def errors(den, solver, schedules, ref):
    """Max abs error against the reference sample `ref`, one per schedule (model times)."""
    return [float((sample(den, NOISE, timesteps=ts, solver=solver) - ref).abs().max()) for ts in schedules]


def orders(errs):
    return [math.log2(a / b) for a, b in zip(errs[:-1], errs[1:], strict=True)]


# -- order of convergence ---------------------------------------------------------------------------------
#
# Every schedule is followed by one step to clean data, an Euler step for every solver. How it is
# chosen decides what is measured:
# - flow, the default uniform schedule 1, ..., 1/n: that last step spans h = 1/n of flow time, its
#   local error is O(h^2), no worse than Heun's global error, so the orders of the full default
#   schedule (what users run) are visible as they are.
# - VP, uniform in the timestep index, would end at t = T/n, where the flow time is about
#   sqrt(T beta_0 / n): the last step shrinks only like n^-1/2 and its O(h^2) = O(1/n) error would
#   eventually cap Heun at first order. So the VP schedules end at a FIXED interior time (t = 100)
#   for every n: the final step is then the same smooth map for every schedule and the reference,
#   and the error measured is the interior integration error.
# - DPM-Solver++(2M) is second order in steps of lambda = log(alpha / sigma); on flow times uniform
#   down to 1/n the steps near s = 0 stay log 2 long, so it is measured on lambda-uniform schedules
#   (and on the VP schedule, which is close to lambda-uniform in the interior).
# Measured (max abs error over 32 samples, n = 8/16/32): flow Euler 1.00/1.00, Heun 2.01/2.01;
# VP Euler 1.10/1.05, Heun 2.11/2.05, DPM++2M 2.26/2.17; flow lambda-uniform DPM++2M 1.97/2.09.

REF_STEPS = 1024


def flow_schedule(n):
    return sampling_timesteps(RectifiedFlow(), n)


def vp_schedule(n):
    return torch.linspace(999.0, 100.0, n, dtype=F64)


def lambda_schedule(n):  # flow times 0.9 .. 0.1, uniform in lambda = log((1 - s) / s)
    lam = torch.linspace(math.log(0.1 / 0.9), math.log(0.9 / 0.1), n, dtype=F64)
    return torch.sigmoid(-lam)


@pytest.mark.parametrize("make, schedule", [(flow_model, flow_schedule), (vp_model, vp_schedule)],
                         ids=["flow", "vp-eps"])
def test_order_of_convergence(make, schedule):
    den = make()
    ns = (8, 16, 32)
    ref = sample(den, NOISE, timesteps=schedule(REF_STEPS), solver="heun")
    e = errors(den, "euler", [schedule(n) for n in ns], ref)
    h = errors(den, "heun", [schedule(n) for n in ns], ref)
    assert all(0.8 <= o <= 1.3 for o in orders(e)), e
    assert all(1.7 <= o <= 2.4 for o in orders(h)), h
    assert all(hh < ee for hh, ee in zip(h, e, strict=True)) and h[-1] < e[-1] / 10
    if make is vp_model:
        d = errors(den, "dpm++2m", [schedule(n) for n in ns], ref)
        assert all(o >= 1.7 for o in orders(d)), d


def test_order_of_convergence_dpmpp_2m_on_lambda_uniform_schedules():
    den = flow_model()
    ns = (8, 16, 32)
    ref = sample(den, NOISE, timesteps=lambda_schedule(REF_STEPS), solver="heun")
    d = errors(den, "dpm++2m", [lambda_schedule(n) for n in ns], ref)
    e = errors(den, "euler", [lambda_schedule(n) for n in ns], ref)
    assert all(1.7 <= o <= 2.4 for o in orders(d)), d
    assert all(dd < ee / 4 for dd, ee in zip(d, e, strict=True))
    # on the default (flow-uniform) schedule it still beats Euler clearly
    ref = sample(den, NOISE, timesteps=flow_schedule(REF_STEPS), solver="heun")
    uni = [flow_schedule(n) for n in (8, 16)]
    assert all(dd < ee / 4 for dd, ee in zip(errors(den, "dpm++2m", uni, ref), errors(den, "euler", uni, ref),
                                             strict=True))


# -- agreement with diffusers ----------------------------------------------------------------------------


def run_diffusers(sched, den, x_start, latent_scale):
    """Drive a diffusers scheduler by hand on den.net, from the actual state x_start at timesteps[0]."""
    lat = x_start * latent_scale
    for t in sched.timesteps:
        out = den.net(sched.scale_model_input(lat, t), t.to(F64).expand(lat.shape[0]), None)
        lat = sched.step(out, t, lat).prev_sample
    return lat


DIFFUSERS_NUMPY_WARNING = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@DIFFUSERS_NUMPY_WARNING
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_euler_matches_diffusers_euler_discrete(spacing, prediction):
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing=spacing, prediction_type=prediction)
    sched.set_timesteps(10)
    # the same model: the same network on the same (float32) alphas_cumprod table
    den = vp_model(VPDiscrete(sched.alphas_cumprod), {"epsilon": "eps", "v_prediction": "v"}[prediction])
    ts = sched.timesteps.to(F64)
    ours = sample(den, NOISE, timesteps=ts, solver="euler")
    # diffusers' latents are x_t / alpha_t (the EDM space); start both from x_t0 = prior_std(t0) * noise
    x_start = float(den.process.prior_std(ts[0])) * NOISE
    theirs = run_diffusers(sched, den, x_start, 1.0 / float(den.process.alpha(ts[0])))
    # diffusers computes its sigmas and steps in float32: agreement to float32 rounding of |x| ~ 10
    assert float((ours - theirs).abs().max()) < 1e-5
    assert float(ours.abs().max()) > 0.5  # not trivially small


@DIFFUSERS_NUMPY_WARNING
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_dpmpp_2m_matches_diffusers_dpm_solver_multistep(prediction):
    """DPM-Solver++ is exact on the linear part of the ODE, so flow and VP coordinates give the same steps."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        timestep_spacing="trailing", prediction_type=prediction,
                                        algorithm_type="dpmsolver++", solver_order=2, lower_order_final=False,
                                        final_sigmas_type="zero")
    sched.set_timesteps(12)
    den = vp_model(VPDiscrete(sched.alphas_cumprod), {"epsilon": "eps", "v_prediction": "v"}[prediction])
    ts = sched.timesteps.to(F64)
    ours = sample(den, NOISE, timesteps=ts, solver="dpm++2m")
    theirs = run_diffusers(sched, den, float(den.process.prior_std(ts[0])) * NOISE, 1.0)  # VP-space latents
    assert float((ours - theirs).abs().max()) < 1e-5
    # and it is not the Euler result
    assert float((ours - sample(den, NOISE, timesteps=ts, solver="euler")).abs().max()) > 1e-3


# -- any process, any prediction type ---------------------------------------------------------------------


@pytest.mark.parametrize("process, prediction", [
    (TrigFlow(0.5), "trigflow"),
    (EDM(sigma_min=0.002, sigma_max=80.0), "x0"),
    (VPDiscrete.from_schedule("linear", 1000, 1e-4, 0.02), "v"),
    (RectifiedFlow(), "eps"),
], ids=["trigflow-F", "edm-x0", "vp-v", "flow-eps"])
def test_the_same_model_in_another_process_gives_the_same_path(process, prediction):
    """Wrap one flow model as a model of another process and prediction type: identical paths."""
    flow_den = flow_model()
    sigma_d = getattr(process, "sigma_d", 1.0)

    class Wrapped(nn.Module):
        def forward(self, x, t, cond=None):
            x_flow, t_flow = convert_state(x, t, process, RectifiedFlow())
            x0 = flow_den(x_flow, t_flow)
            return from_x0(x0, x, t, process, prediction, sigma_d=sigma_d)

    den = Denoiser(Wrapped(), process, prediction, sigma_d=sigma_d, data_shape=(2,))
    t_flow = torch.tensor([0.9, 0.8, 0.55, 0.3, 0.1], dtype=F64)  # within every process' range
    t_other = convert_time(t_flow, RectifiedFlow(), process)
    for solver in ODE_SOLVERS:
        a = sample(flow_den, NOISE, timesteps=t_flow, solver=solver, capture=True)
        b = sample(den, NOISE, timesteps=t_other, solver=solver, capture=True)
        torch.testing.assert_close(a.x, b.x, rtol=1e-8, atol=1e-8)
        # captured states are in each model's own process: the same states up to the scale alpha'/alpha
        for i in range(len(t_flow)):
            xi, _ = convert_state(b.xs[i], t_other[i], process, RectifiedFlow())
            torch.testing.assert_close(xi, a.xs[i], rtol=1e-8, atol=1e-8)


def test_flow_coordinates():
    for p in (RectifiedFlow(), TrigFlow(0.5), EDM(), VPDiscrete.from_schedule("linear", 1000, 1e-4, 0.02)):
        t = torch.linspace(p.t_min, p.t_max, 7, dtype=F64)
        s, c = flow_time(p, t), flow_scale(p, t)
        # x_t = c x_f, with x_f = (1 - s) x0 + s eps: c (1 - s) = alpha and c s = sigma
        torch.testing.assert_close(c * (1 - s), p.alpha(t), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(c * s, p.sigma(t), rtol=1e-12, atol=1e-15)
    assert float(flow_time(TrigFlow(0.5), math.pi / 2)) == 1.0 and float(flow_time(RectifiedFlow(), 1.0)) == 1.0


# -- CFG, capture, dtypes, gradients, errors --------------------------------------------------------------


def test_cfg_is_applied_per_call():
    den = Denoiser(SmoothNet(num_classes=3), RectifiedFlow(), "flow", cond_kind="class", num_classes=3,
                   data_shape=(2,))
    noise = NOISE[:5]
    y = torch.tensor([0, 1, 2, 0, 1])
    ts = torch.tensor([1.0, 0.4], dtype=F64)
    out = sample(den, noise, timesteps=ts, solver="euler", cond=y, guidance=2.5)

    def x0_guided(x, t):
        t = torch.full((5,), t, dtype=F64)
        x0_c, x0_u = den.predict(x, t, y, kind="x0"), den.predict(x, t, None, kind="x0")
        return x0_u + 2.5 * (x0_c - x0_u)

    x0 = x0_guided(noise, 1.0)  # at pure noise x_t = noise = eps
    x_next = 0.6 * x0 + 0.4 * noise
    torch.testing.assert_close(out, x0_guided(x_next, 0.4))
    assert float((out - sample(den, noise, timesteps=ts, solver="euler", cond=y)).abs().max()) > 1e-3
    # a per-sample guidance tensor acts row by row
    w = torch.tensor([1.0, 2.5, 2.5, 1.0, 2.5], dtype=F64)
    mixed = sample(den, noise, timesteps=ts, solver="heun", cond=y, guidance=w)
    for g in (1.0, 2.5):
        rows = w == g
        torch.testing.assert_close(mixed[rows], sample(den, noise, timesteps=ts, solver="heun", cond=y,
                                                       guidance=g)[rows])


@pytest.mark.parametrize("solver", SOLVERS)
def test_trajectory_capture(solver):
    den = vp_model()
    proc = den.process
    noise = NOISE[:4]
    traj = sample(den, noise, steps=5, solver=solver, capture=True, seeds=[1, 2, 3, 4])
    assert traj.xs.shape == (6, 4, 2) and traj.x0s.shape == (5, 4, 2) and traj.ts.shape == (5,)
    torch.testing.assert_close(traj.ts, sampling_timesteps(proc, 5))
    torch.testing.assert_close(traj.xs[0], float(proc.prior_std(traj.ts[0])) * noise)
    torch.testing.assert_close(traj.xs[-1], traj.x)
    for i in range(5):
        torch.testing.assert_close(traj.x0s[i], den(traj.xs[i], traj.ts[i].expand(4)))
    plain = sample(den, noise, steps=5, solver=solver, seeds=[1, 2, 3, 4])
    torch.testing.assert_close(traj.x, plain)
    if solver == "euler":  # the states are the model's own: DDIM steps x_{i+1} = alpha x0 + sigma eps_i
        a, s = proc.alpha(traj.ts), proc.sigma(traj.ts)
        for i in range(4):
            eps = (traj.xs[i] - a[i] * traj.x0s[i]) / s[i]
            torch.testing.assert_close(traj.xs[i + 1], a[i + 1] * traj.x0s[i] + s[i + 1] * eps)


def test_low_precision_models_get_exact_times_and_a_float32_solver_state():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x, t, cond=None):
            seen.append(t.clone())
            return torch.zeros_like(x)

    den = Denoiser(Recorder(), VPDiscrete.from_schedule("scaled_linear"), "eps", data_shape=(2,))
    noise = NOISE[:3].to(torch.bfloat16)
    for solver in SOLVERS:
        seen.clear()
        out = sample(den, noise, timesteps=[999.0, 749.0, 499.0], solver=solver)
        assert out.dtype == torch.bfloat16
        assert {tuple(t.tolist()) for t in seen} == {(999.0,) * 3, (749.0,) * 3, (499.0,) * 3}
        assert all(t.dtype == torch.float32 for t in seen)


def test_gradients_flow_through_the_sampler():
    net = SmoothNet()
    den = Denoiser(net, RectifiedFlow(), "flow", data_shape=(2,))
    w = net.w2.clone().requires_grad_(True)
    net.w2 = w
    sample(den, NOISE[:4], steps=3, solver="heun").square().sum().backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


def test_bad_arguments_raise():
    den = flow_model()
    noise = NOISE[:2]
    with pytest.raises(FewstepError, match=r"unknown solver 'rk4'; allowed: euler, heun, dpm\+\+2m, fewstep"):
        sample(den, noise, steps=3, solver="rk4")
    with pytest.raises(FewstepError, match="decreasing"):
        sample(den, noise, timesteps=[0.2, 0.5])
    with pytest.raises(FewstepError, match="noisy"):
        sample(den, noise, timesteps=[1.0, 0.5, 0.0])  # the step to clean data is the sampler's own
    with pytest.raises(FewstepError, match="steps or timesteps"):
        sample(den, noise)
    with pytest.raises(FewstepError, match="spacing"):
        sample(den, noise, steps=3, spacing="cosine")
