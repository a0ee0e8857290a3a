"""Noise processes: derivatives, inverses, diffusers schedules, closed-form time and state maps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fewstep.diffusion import (
    EDM,
    RectifiedFlow,
    TrigFlow,
    VPDiscrete,
    betas_for_schedule,
    convert_state,
    convert_time,
    process_from_config,
)
from fewstep.errors import FewstepError

F64 = torch.float64

PROCESSES = {
    "flow": RectifiedFlow(),
    "trig1": TrigFlow(1.0),
    "trig0.5": TrigFlow(0.5),
    "edm": EDM(),
    "vp-scaled": VPDiscrete.from_schedule("scaled_linear"),
    "vp-linear": VPDiscrete.from_schedule("linear", beta_start=1e-4, beta_end=0.02),
    "vp-cos": VPDiscrete.from_schedule("squaredcos_cap_v2"),
}
NAMES = list(PROCESSES)
VP_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]

# Ratios every process above can represent: SD's scaled_linear VP spans about [0.029, 14.6].
LOG_R_LO, LOG_R_HI = math.log(0.035), math.log(14.0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def interior_times(p, n=64, seed=0, margin=0.02):
    """n sorted times strictly inside (t_min, t_max); log-spaced for EDM whose range spans decades."""
    u = torch.sort(torch.rand(n, generator=gen(seed), dtype=F64)).values
    u = margin + (1 - 2 * margin) * u
    if isinstance(p, EDM):
        return torch.exp(math.log(p.t_min) + u * (math.log(p.t_max) - math.log(p.t_min)))
    return p.t_min + u * (p.t_max - p.t_min)


def noise(shape, seed):
    g = gen(seed)
    return torch.randn(*shape, generator=g, dtype=F64), torch.randn(*shape, generator=g, dtype=F64)


# -- alpha, sigma and their derivatives ------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_central_finite_differences(name):
    p = PROCESSES[name]
    t = interior_times(p)
    if isinstance(p, VPDiscrete):
        # log r is piecewise linear between integers: keep t +- h inside one segment
        t = torch.floor(t) + 0.25 + 0.5 * (t - torch.floor(t))
    h = 1e-6 * t if isinstance(p, EDM) else torch.full_like(t, 1e-6 * (p.t_max - p.t_min))
    for f, df in [(p.alpha, p.d_alpha), (p.sigma, p.d_sigma)]:
        fd = (f(t + h) - f(t - h)) / (2 * h)
        torch.testing.assert_close(df(t), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_ratio_is_sigma_over_alpha_and_add_noise_uses_alpha_sigma(name):
    p = PROCESSES[name]
    t = interior_times(p, 6)
    torch.testing.assert_close(p.ratio(t), p.sigma(t) / p.alpha(t), rtol=1e-12, atol=0)
    torch.testing.assert_close(p.logsnr(t), torch.log(p.alpha(t) ** 2 / p.sigma(t) ** 2), rtol=1e-10, atol=1e-10)
    x0, eps = noise((6, 2, 3), 1)
    expected = p.alpha(t)[:, None, None] * x0 + p.sigma(t)[:, None, None] * eps
    torch.testing.assert_close(p.add_noise(x0, eps, t), expected, rtol=1e-12, atol=1e-12)
    # a scalar time broadcasts over the batch
    t0 = float(t[2])
    torch.testing.assert_close(p.add_noise(x0, eps, t0), p.alpha(t[2]) * x0 + p.sigma(t[2]) * eps)


def test_alpha_sigma_closed_forms():
    t = torch.linspace(0.05, 0.95, 7, dtype=F64)
    torch.testing.assert_close(RectifiedFlow().alpha(t), 1 - t)
    torch.testing.assert_close(RectifiedFlow().sigma(t), t)
    tau = t * math.pi / 2
    torch.testing.assert_close(TrigFlow(0.5).alpha(tau), torch.cos(tau))
    torch.testing.assert_close(TrigFlow(0.5).sigma(tau), 0.5 * torch.sin(tau))
    sig = torch.tensor([0.002, 0.5, 80.0], dtype=F64)
    torch.testing.assert_close(EDM().alpha(sig), torch.ones(3, dtype=F64))
    torch.testing.assert_close(EDM().sigma(sig), sig)
    # pure noise at the end of flow and TrigFlow: infinite ratio, exactly t_max back
    for p in (RectifiedFlow(), TrigFlow(1.0), TrigFlow(0.5)):
        r = p.ratio(torch.tensor(p.t_max, dtype=F64))
        assert math.isinf(float(r))
        assert float(p.t_from_ratio(r)) == p.t_max
        assert float(p.ratio(torch.tensor(0.0, dtype=F64))) == 0.0


# -- ratio and its inverse -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_ratio_strictly_increasing_and_inverse_round_trip(name):
    p = PROCESSES[name]
    t = interior_times(p, 400, margin=0.0)
    t = torch.cat([torch.tensor([p.t_min], dtype=F64), t])
    r = p.ratio(t)
    assert torch.all(r[1:] > r[:-1])
    torch.testing.assert_close(p.t_from_ratio(r), t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_t_from_ratio_is_clamped_to_the_time_range(name):
    p = PROCESSES[name]
    r = torch.tensor([0.0, 1e-9, 1e9, math.inf], dtype=F64)
    t = p.t_from_ratio(r)
    assert torch.all(t >= p.t_min) and torch.all(t <= p.t_max)
    assert float(t[0]) == pytest.approx(p.t_min, abs=1e-12)
    assert float(t[-1]) == pytest.approx(p.t_max, abs=1e-9)


@pytest.mark.parametrize("schedule", VP_SCHEDULES)
def test_vp_integer_times_are_the_discrete_table(schedule):
    p = VPDiscrete.from_schedule(schedule)
    t = torch.arange(p.num_train_timesteps, dtype=F64)
    acp = p.alphas_cumprod
    torch.testing.assert_close(p.alpha(t), torch.sqrt(acp), rtol=1e-13, atol=0)
    torch.testing.assert_close(p.sigma(t), torch.sqrt(1 - acp), rtol=1e-12, atol=0)
    torch.testing.assert_close(p.ratio(t), torch.sqrt((1 - acp) / acp), rtol=1e-13, atol=0)
    assert (p.t_min, p.t_max) == (0.0, 999.0)
    # float32 times give the same table (computed in float64 inside)
    torch.testing.assert_close(p.alpha(t.float()), torch.sqrt(acp).float())


@pytest.mark.parametrize("schedule", VP_SCHEDULES)
def test_vp_from_diffusers_config_matches_diffusers(schedule):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule=schedule)
    p = VPDiscrete.from_diffusers_config(dict(sched.config))
    ref = sched.alphas_cumprod.to(F64)  # diffusers works in float32
    assert p.alphas_cumprod.shape == ref.shape
    torch.testing.assert_close(p.alphas_cumprod, ref, rtol=5e-5, atol=1e-9)
    torch.testing.assert_close(betas_for_schedule(schedule, 1000, 1e-4, 0.02), sched.betas.to(F64),
                               rtol=1e-5, atol=1e-8)
    t = torch.arange(0, 1000, 37, dtype=F64)
    torch.testing.assert_close(p.alpha(t), torch.sqrt(ref[t.long()]), rtol=5e-5, atol=1e-7)


def test_vp_from_diffusers_trained_betas_and_sd_config():
    from diffusers import DDIMScheduler

    betas = torch.linspace(1e-4, 0.03, 50, dtype=F64)
    p = VPDiscrete.from_diffusers_config({"trained_betas": betas.tolist()})
    torch.testing.assert_close(p.alphas_cumprod, torch.cumprod(1 - betas, 0))
    assert p.num_train_timesteps == 50 and p.t_max == 49.0
    # Stable Diffusion's scheduler config
    sd = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    q = VPDiscrete.from_diffusers_config(dict(sd.config))
    torch.testing.assert_close(q.alphas_cumprod, sd.alphas_cumprod.to(F64), rtol=1e-5, atol=1e-9)
    assert q.config() == PROCESSES["vp-scaled"].config()


def test_vp_rejects_bad_tables_and_schedules():
    with pytest.raises(FewstepError, match="decreasing"):
        VPDiscrete(torch.tensor([0.5, 0.9]))
    with pytest.raises(FewstepError, match=r"\(0, 1\)"):
        VPDiscrete(torch.tensor([1.0, 0.5]))
    with pytest.raises(FewstepError):
        VPDiscrete(torch.tensor([0.5]))
    with pytest.raises(FewstepError, match="allowed"):
        VPDiscrete.from_schedule("cosine")
    with pytest.raises(FewstepError, match="unknown process"):
        process_from_config({"type": "ve"})


@pytest.mark.parametrize("name", NAMES + ["vp-table"])
def test_config_round_trip(name):
    if name == "vp-table":
        p = VPDiscrete(torch.cumprod(1 - torch.linspace(1e-3, 0.05, 40, dtype=F64), 0))
    else:
        p = PROCESSES[name]
    cfg = json.loads(json.dumps(p.config()))  # configs are stored as JSON
    q = process_from_config(cfg)
    assert type(q) is type(p)
    assert q.config() == p.config()
    assert (q.t_min, q.t_max) == (p.t_min, p.t_max)
    t = interior_times(p, 9)
    torch.testing.assert_close(q.alpha(t), p.alpha(t), rtol=1e-14, atol=0)
    torch.testing.assert_close(q.sigma(t), p.sigma(t), rtol=1e-14, atol=0)
    assert repr(p).startswith(type(p).__name__ + "(")


def test_non_default_configs_survive_round_trip():
    for p in (EDM(sigma_min=0.01, sigma_max=120.0), TrigFlow(0.5),
              VPDiscrete.from_schedule("linear", num_train_timesteps=200, beta_start=1e-3, beta_end=0.03)):
        q = process_from_config(p.config())
        assert q.config() == p.config()
        assert (q.t_min, q.t_max) == (p.t_min, p.t_max)


# -- closed-form maps between processes ------------------------------------------------------------


def test_flow_trigflow_closed_form():
    """sigma_d = 1: t_flow = sin(tau) / (sin(tau) + cos(tau)), x_flow = x_trig / (sin(tau) + cos(tau))."""
    tau = torch.linspace(0.01, 1.56, 23, dtype=F64)
    x = noise((23, 3), 0)[0]
    sc = torch.sin(tau) + torch.cos(tau)
    x_flow, t_flow = convert_state(x, tau, TrigFlow(1.0), RectifiedFlow())
    torch.testing.assert_close(t_flow, torch.sin(tau) / sc, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x_flow, x / sc[:, None], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(convert_time(tau, TrigFlow(1.0), RectifiedFlow()), torch.sin(tau) / sc)
    # and back
    x_back, tau_back = convert_state(x_flow, t_flow, RectifiedFlow(), TrigFlow(1.0))
    torch.testing.assert_close(tau_back, tau, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_back, x, rtol=1e-12, atol=1e-12)


def test_flow_edm_closed_form():
    """sigma = t / (1 - t), x_edm = x_flow / (1 - t)."""
    t = torch.linspace(0.01, 0.98, 17, dtype=F64)
    x = noise((17, 2), 1)[0]
    x_edm, sigma = convert_state(x, t, RectifiedFlow(), EDM())
    torch.testing.assert_close(sigma, t / (1 - t), rtol=1e-12, atol=0)
    torch.testing.assert_close(x_edm, x / (1 - t)[:, None], rtol=1e-12, atol=0)
    x_back, t_back = convert_state(x_edm, sigma, EDM(), RectifiedFlow())
    torch.testing.assert_close(t_back, t, rtol=1e-12, atol=0)
    torch.testing.assert_close(x_back, x, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("schedule", ["scaled_linear", "squaredcos_cap_v2"])
def test_vp_edm_closed_form(schedule):
    """sigma_edm = sqrt((1 - abar) / abar), x_edm = x_vp / sqrt(abar)."""
    vp = VPDiscrete.from_schedule(schedule)
    edm = EDM(sigma_min=1e-4, sigma_max=1e5)
    ts = torch.tensor([0.0, 10.0, 250.0, 500.0, 750.0, 999.0], dtype=F64)
    abar = vp.alphas_cumprod[ts.long()]
    x = noise((6, 2), 2)[0]
    x_edm, sigma = convert_state(x, ts, vp, edm)
    torch.testing.assert_close(sigma, torch.sqrt((1 - abar) / abar), rtol=1e-12, atol=0)
    torch.testing.assert_close(x_edm, x / torch.sqrt(abar)[:, None], rtol=1e-12, atol=0)
    x_back, t_back = convert_state(x_edm, sigma, edm, vp)
    torch.testing.assert_close(t_back, ts, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x_back, x, rtol=1e-12, atol=1e-14)


def test_pure_noise_maps_between_flow_and_trigflow():
    eps = noise((3, 4), 3)[1]
    for sd in (0.5, 1.0):
        trig = TrigFlow(sd)
        x_trig, tau = convert_state(eps, torch.tensor(1.0, dtype=F64), RectifiedFlow(), trig)
        assert float(tau) == trig.t_max
        torch.testing.assert_close(x_trig, sd * eps)
        x_flow, t = convert_state(sd * eps, torch.tensor(trig.t_max, dtype=F64), trig, RectifiedFlow())
        assert float(t) == 1.0
        torch.testing.assert_close(x_flow, eps)


def test_clean_data_maps_to_clean_data():
    x0 = noise((3, 4), 5)[0]
    zero = torch.zeros(3, dtype=F64)
    for src in ("flow", "trig1", "trig0.5"):
        for dst in NAMES:
            p, q = PROCESSES[src], PROCESSES[dst]
            y, s = convert_state(x0, zero, p, q)
            torch.testing.assert_close(s, torch.full_like(s, q.t_min), rtol=0, atol=1e-9)
            # sigma = 0 here: the scale must come from the alphas, not from 0 / 0 or x / 0
            torch.testing.assert_close(y, q.alpha(s)[:, None] * x0, msg=f"{src}->{dst}")


def test_convert_state_float32_and_scalar_time():
    x = noise((4, 3), 4)[0].float()
    y, s = convert_state(x, 0.3, RectifiedFlow(), EDM())
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y, x / 0.7)
    assert float(s) == pytest.approx(0.3 / 0.7)


# -- hypothesis: states survive conversion between every pair of processes -------------------------

PAIRS = [(a, b) for a in NAMES for b in NAMES]


@pytest.mark.parametrize(("src", "dst"), PAIRS)
@settings(max_examples=6, deadline=None)
@given(log_r=st.lists(st.floats(LOG_R_LO, LOG_R_HI), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_convert_state_keeps_x0_and_eps(src, dst, log_r, seed):
    p, q = PROCESSES[src], PROCESSES[dst]
    n = len(log_r)
    x0, eps = noise((n, 2, 3), seed)
    t = p.t_from_ratio(torch.exp(torch.tensor(log_r, dtype=F64)))
    x_q, s = convert_state(p.add_noise(x0, eps, t), t, p, q)
    assert s.shape == t.shape
    assert torch.all(s >= q.t_min) and torch.all(s <= q.t_max)
    torch.testing.assert_close(q.ratio(s), p.ratio(t), rtol=1e-9, atol=0)
    torch.testing.assert_close(x_q, q.add_noise(x0, eps, s), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(convert_time(s, q, p), t, rtol=1e-8, atol=1e-8)
