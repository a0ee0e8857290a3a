"""The sampler engine: convergence orders, agreement with diffusers, seeds, CFG, capture, few-step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewstep.diffusion import (
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
from fewstep.sampling import generate, sample, sample_fewstep


class SmoothNet(nn.Module):
    """A fixed, smooth random network (tanh MLP) of (x, t), optionally class-conditional."""

    def __init__(self, dim=2, hidden=32, time_scale=1.0, num_classes=None, dtype=torch.float64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(dim + 1, hidden, generator=g, dtype=dtype) / math.sqrt(dim + 1))
        self.w2 = nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=dtype) / math.sqrt(hidden))
        self.emb = nn.Parameter(torch.randn((num_classes or 0) + 1, hidden, generator=g, dtype=dtype))
        self.time_scale = time_scale

    def forward(self, x, t, cond=None):
        h = torch.cat([x, (t * self.time_scale)[:, None].to(x.dtype)], dim=1) @ self.w1
        if cond is not None:
            h = h + self.emb[cond]
        return torch.tanh(h) @ self.w2


def flow_model(**kw):
    return Denoiser(SmoothNet(**kw), RectifiedFlow(), "flow", data_shape=(2,))


def vp_model():
    return Denoiser(SmoothNet(time_scale=1e-3), VPDiscrete.from_schedule("scaled_linear"), "eps", data_shape=(2,))


def errors(den, solver, schedules, ref_schedule):
    """Max error vs a fine Heun solve, for each of a list of schedules (model times)."""
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = sample(den, noise, timesteps=ref_schedule, solver="heun")
    return [float((sample(den, noise, timesteps=ts, solver=solver) - ref).abs().max()) for ts in schedules]


def observed_order(errs):
    return math.log2(errs[-2] / errs[-1])


@pytest.mark.parametrize("make, ns", [(flow_model, (8, 16, 32)), (vp_model, (16, 32, 64))], ids=["flow", "vp-eps"])
def test_order_of_convergence_euler_heun(make, ns):
    """Euler ~1, Heun ~2 against a 512-step Heun solve on uniform schedules.

    The last step to clean data is an Euler step for every solver (as in Karras et al.); its local
    error is O(h^2), so the global order stays visible.
    """
    den = make()
    scheds = [sampling_timesteps(den.process, n) for n in ns]
    ref = sampling_timesteps(den.process, 512)
    e = errors(den, "euler", scheds, ref)
    h = errors(den, "heun", scheds, ref)
    assert 0.8 <= observed_order(e) <= 1.25, e
    assert 1.7 <= observed_order(h) <= 2.3, h
    assert all(hh < ee for hh, ee in zip(h, e, strict=True))


def test_order_of_convergence_dpmpp_2m():
    """DPM-Solver++(2M) is 2nd order on schedules uniform in log-SNR (what it was designed for).

    On schedules uniform in flow time its log-SNR steps near s = 0 do not shrink with n
    (from s = 2/n to 1/n is always log 2), so there it is only checked to beat Euler.
    """
    den = flow_model()

    def lam_uniform(n):  # s from 0.9 to 0.1, uniform in lambda = log((1 - s) / s)
        lam = torch.linspace(math.log(0.1 / 0.9), math.log(0.9 / 0.1), n, dtype=torch.float64)
        return torch.sigmoid(-lam)

    d = errors(den, "dpm++2m", [lam_uniform(n) for n in (8, 16, 32)], lam_uniform(512))
    assert 1.7 <= observed_order(d) <= 2.3, d
    uni = [sampling_timesteps(den.process, n) for n in (8, 16)]
    ref = sampling_timesteps(den.process, 512)
    assert all(a < b for a, b in zip(errors(den, "dpm++2m", uni, ref), errors(den, "euler", uni, ref), strict=True))


def test_euler_matches_diffusers_euler_discrete_on_vp_eps():
    from diffusers import EulerDiscreteScheduler

    den = Denoiser(SmoothNet(time_scale=1e-3, dtype=torch.float32), VPDiscrete.from_schedule("scaled_linear"),
                   "eps", data_shape=(2,))
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    steps = 10
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="trailing")
    sched.set_timesteps(steps)
    ts = sched.timesteps.double()
    ours = sample(den, noise, timesteps=ts, solver="euler")
    # diffusers works on x / alpha; start from the same actual state x_{t0} = prior_std(t0) * noise
    proc = den.process
    x_t0 = float(proc.prior_std(ts[0])) * noise
    lat = x_t0 / float(proc.alpha(ts[0]))
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(lat, t)
            eps = den.net(inp, t.float().expand(16), None)
            lat = sched.step(eps, t, lat).prev_sample
    torch.testing.assert_close(ours, lat, rtol=1e-4, atol=1e-5)


def test_same_model_in_another_process_gives_same_samples():
    """Wrap a flow model as a TrigFlow F-predictor: Euler and Heun paths are identical (any process works)."""
    flow_den = flow_model()
    trig = TrigFlow(0.5)

    class AsTrig(nn.Module):
        def forward(self, x, tau, cond=None):
            xf, t = convert_state(x, tau, trig, RectifiedFlow())
            x0 = flow_den(xf, t)
            return from_x0(x0, x, tau, trig, "trigflow", sigma_d=0.5)

    trig_den = Denoiser(AsTrig(), trig, "trigflow", sigma_d=0.5, data_shape=(2,))
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t_flow = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.1], dtype=torch.float64)
    t_trig = convert_time(t_flow, RectifiedFlow(), trig)
    for solver in ("euler", "heun", "dpm++2m"):
        a = sample(flow_den, noise, timesteps=t_flow, solver=solver)
        b = sample(trig_den, noise, timesteps=t_trig, solver=solver)
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("solver", ["heun", "dpm++2m", "fewstep"])
def test_per_sample_seeds_do_not_depend_on_batch_size(solver):
    den = Denoiser(SmoothNet(dtype=torch.float32, num_classes=3), RectifiedFlow(), "flow", cond_kind="class",
                   num_classes=3, data_shape=(2,))
    a, la = generate(den, 7, steps=4, solver=solver, seed=5, batch_size=7)
    b, lb = generate(den, 7, steps=4, solver=solver, seed=5, batch_size=3)
    torch.testing.assert_close(a, b)
    assert la.tolist() == lb.tolist() == [0, 1, 2, 0, 1, 2, 0]
    c, _ = generate(den, 7, steps=4, solver=solver, seed=6, batch_size=7)
    assert not torch.allclose(a, c)


def test_cfg_per_call():
    den = Denoiser(SmoothNet(num_classes=3), RectifiedFlow(), "flow", cond_kind="class", num_classes=3,
                   data_shape=(2,))
    noise = torch.randn(5, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    out = sample(den, noise, timesteps=[1.0], solver="euler", cond=y, guidance=2.5)  # one step: x0 at t = 1
    t = torch.ones(5, dtype=torch.float64)
    x0_c, x0_u = den(noise, t, y), den(noise, t, den.null_condition(5))
    torch.testing.assert_close(out, x0_u + 2.5 * (x0_c - x0_u))


@pytest.mark.parametrize("solver", ["euler", "heun", "dpm++2m", "fewstep"])
def test_trajectory_capture(solver):
    den = vp_model()
    noise = torch.randn(4, 2, dtype=torch.float64)
    traj = sample(den, noise, steps=5, solver=solver, capture=True, seeds=[1, 2, 3, 4])
    assert traj.xs.shape == (6, 4, 2) and traj.x0s.shape == (5, 4, 2) and traj.ts.shape == (5,)
    torch.testing.assert_close(traj.xs[0], float(den.process.prior_std(traj.ts[0])) * noise)
    torch.testing.assert_close(traj.xs[-1], traj.x)
    torch.testing.assert_close(traj.x0s[0], den(traj.xs[0], traj.ts[0].expand(4)))
    if solver != "fewstep":
        torch.testing.assert_close(traj.x, sample(den, noise, steps=5, solver=solver))


def test_fewstep_sampler():
    point = torch.tensor([0.3, -1.2], dtype=torch.float64)

    class PointMass(nn.Module):
        def forward(self, x, t, cond=None):
            return point.expand_as(x)

    den = Denoiser(PointMass(), RectifiedFlow(), "x0", data_shape=(2,))
    noise = torch.randn(6, 2, dtype=torch.float64)
    torch.testing.assert_close(sample_fewstep(den, noise, [1.0]), point.expand(6, 2))
    torch.testing.assert_close(sample_fewstep(den, noise, [1.0, 0.5], seeds=list(range(6))), point.expand(6, 2))
    # deterministic re-noise is DDIM, which is Euler in any parametrisation
    den2 = vp_model()
    ts = [999.0, 700.0, 400.0, 100.0]
    torch.testing.assert_close(sample_fewstep(den2, noise, ts, renoise="deterministic"),
                               sample(den2, noise, timesteps=ts, solver="euler"), rtol=1e-9, atol=1e-9)
    # fresh re-noise draws new noise: differs from the deterministic path
    assert not torch.allclose(sample_fewstep(den2, noise, ts, seeds=list(range(6))),
                              sample_fewstep(den2, noise, ts, renoise="deterministic"))


def test_bad_arguments():
    den = flow_model()
    noise = torch.randn(2, 2, dtype=torch.float64)
    with pytest.raises(FewstepError, match="unknown solver 'rk4'; allowed: euler, heun, dpm\\+\\+2m, fewstep"):
        sample(den, noise, steps=3, solver="rk4")
    with pytest.raises(FewstepError, match="decreasing"):
        sample(den, noise, timesteps=[0.2, 0.5])
    with pytest.raises(FewstepError, match="renoise"):
        sample_fewstep(den, noise, [1.0, 0.5], renoise="sometimes")
