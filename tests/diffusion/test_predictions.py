"""Prediction types: exact round trips between every pair, for every process, and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fewstep.diffusion import (
    EDM,
    PREDICTION_TYPES,
    RectifiedFlow,
    TrigFlow,
    VPDiscrete,
    convert_prediction,
    convert_state,
    from_x0,
    prediction_coeffs,
    to_x0,
    to_x0_eps,
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
PAIRS = [(a, b) for a in PREDICTION_TYPES for b in PREDICTION_TYPES]

# Ratios every process above can represent (SD's scaled_linear VP spans about [0.029, 14.6]).
LOG_R_LO, LOG_R_HI = math.log(0.035), math.log(14.0)


def noise(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64), torch.randn(*shape, generator=g, dtype=F64)


def own_times(p, u):
    """Map u in [0, 1] into the process' own time range, away from the singular endpoints."""
    u = torch.as_tensor(u, dtype=F64)
    if isinstance(p, EDM):
        return torch.exp(math.log(p.t_min) + u * (math.log(p.t_max) - math.log(p.t_min)))
    lo, hi = p.t_min, p.t_max
    margin = 0.01 * (hi - lo)
    return lo + margin + u * (hi - lo - 2 * margin)


def times_at_log_ratio(p, log_r):
    return p.t_from_ratio(torch.exp(torch.as_tensor(log_r, dtype=F64)))


def col(c):
    return c[:, None, None]


# -- hypothesis round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=12, deadline=None)
@given(u=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1),
       sigma_d=st.sampled_from([0.5, 1.0]))
def test_every_pair_of_prediction_types_round_trips(name, u, seed, sigma_d):
    p = PROCESSES[name]
    t = own_times(p, u)
    x0, eps = noise((len(u), 3, 2), seed)
    xt = p.add_noise(x0, eps, t)
    for src, dst in PAIRS:
        pred = from_x0(x0, xt, t, p, src, sigma_d)
        there = convert_prediction(pred, xt, t, p, src, dst, sigma_d)
        back = convert_prediction(there, xt, t, p, dst, src, sigma_d)
        scale = float(pred.abs().max()) + 1.0
        torch.testing.assert_close(back, pred, rtol=1e-8, atol=1e-9 * scale, msg=f"{src}->{dst}->{src}")
        # a random tensor (not tied to x_t) also survives the round trip: the maps are inverse linear maps
        junk = noise((len(u), 3, 2), seed + 1)[0]
        again = convert_prediction(convert_prediction(junk, xt, t, p, src, dst, sigma_d), xt, t, p, dst, src,
                                   sigma_d)
        torch.testing.assert_close(again, junk, rtol=1e-8, atol=1e-8, msg=f"{src}->{dst}->{src} (junk)")


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=12, deadline=None)
@given(u=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1),
       sigma_d=st.sampled_from([0.5, 1.0]))
def test_to_x0_eps_recovers_the_decomposition(name, u, seed, sigma_d):
    p = PROCESSES[name]
    t = own_times(p, u)
    x0, eps = noise((len(u), 3, 2), seed)
    xt = p.add_noise(x0, eps, t)
    for kind in PREDICTION_TYPES:
        pred = from_x0(x0, xt, t, p, kind, sigma_d)
        a, b = prediction_coeffs(kind, p, t, sigma_d)
        torch.testing.assert_close(pred, col(a) * x0 + col(b) * eps, rtol=1e-8, atol=1e-8, msg=kind)
        x0_b, eps_b = to_x0_eps(pred, xt, t, p, kind, sigma_d)
        torch.testing.assert_close(x0_b, x0, rtol=1e-8, atol=1e-8, msg=kind)
        torch.testing.assert_close(eps_b, eps, rtol=1e-8, atol=1e-8, msg=kind)
        torch.testing.assert_close(to_x0(pred, xt, t, p, kind, sigma_d), x0, rtol=1e-8, atol=1e-8, msg=kind)
        # converting to x0 / eps directly agrees with the decomposition
        torch.testing.assert_close(convert_prediction(pred, xt, t, p, kind, "x0", sigma_d), x0, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(convert_prediction(pred, xt, t, p, kind, "eps", sigma_d), eps, rtol=1e-8,
                                   atol=1e-8)


@pytest.mark.parametrize("src", NAMES)
@settings(max_examples=10, deadline=None)
@given(log_r=st.lists(st.floats(LOG_R_LO, LOG_R_HI), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1),
       dst=st.sampled_from(NAMES), sigma_d=st.sampled_from([0.5, 1.0]))
def test_prediction_read_through_another_process_gives_same_x0(src, log_r, seed, dst, sigma_d):
    p, q = PROCESSES[src], PROCESSES[dst]
    t = times_at_log_ratio(p, log_r)
    x0, eps = noise((len(log_r), 2, 3), seed)
    xt = p.add_noise(x0, eps, t)
    xq, s = convert_state(xt, t, p, q)
    for kind in PREDICTION_TYPES:
        # x0 from a prediction of p, re-expressed as a prediction of q at the converted state
        x0_p = to_x0(from_x0(x0, xt, t, p, kind, sigma_d), xt, t, p, kind, sigma_d)
        pred_q = from_x0(x0_p, xq, s, q, kind, sigma_d)
        x0_q, eps_q = to_x0_eps(pred_q, xq, s, q, kind, sigma_d)
        torch.testing.assert_close(x0_q, x0, rtol=1e-8, atol=1e-8, msg=kind)
        torch.testing.assert_close(eps_q, eps, rtol=1e-8, atol=1e-8, msg=kind)
    # eps, x0 and TrigFlow's F depend only on (x0, eps, SNR): the same tensor reads the same in both
    for kind in ("eps", "x0", "trigflow"):
        pred_p = from_x0(x0, xt, t, p, kind, sigma_d)
        torch.testing.assert_close(to_x0(pred_p, xq, s, q, kind, sigma_d), x0, rtol=1e-8, atol=1e-8, msg=kind)


# -- closed forms ---------------------------------------------------------------------------------------


def test_rectified_flow_velocity_is_eps_minus_x0():
    flow = RectifiedFlow()
    t = torch.linspace(0.02, 0.98, 6, dtype=F64)
    x0, eps = noise((6, 3, 2), 0)
    xt = flow.add_noise(x0, eps, t)
    torch.testing.assert_close(from_x0(x0, xt, t, flow, "flow"), eps - x0)
    eps_pred = from_x0(x0, xt, t, flow, "eps")
    torch.testing.assert_close(eps_pred, eps)
    torch.testing.assert_close(convert_prediction(eps_pred, xt, t, flow, "eps", "flow"), eps - x0)
    # x0 = x_t - t v for rectified flow
    torch.testing.assert_close(to_x0(eps - x0, xt, t, flow, "flow"), xt - col(t) * (eps - x0))


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_vp_v_prediction_matches_alpha_eps_minus_sigma_x0_and_diffusers(schedule):
    from diffusers import DDPMScheduler

    vp = VPDiscrete.from_schedule(schedule, beta_start=1e-4, beta_end=0.02)
    ts = torch.tensor([0, 1, 100, 400, 700, 999])
    t = ts.to(F64)
    abar = vp.alphas_cumprod[ts]
    x0, eps = noise((6, 3, 2), 1)
    xt = vp.add_noise(x0, eps, t)
    v = from_x0(x0, xt, t, vp, "v")
    torch.testing.assert_close(v, col(abar.sqrt()) * eps - col((1 - abar).sqrt()) * x0)
    # x0 = alpha x_t - sigma v and eps = sigma x_t + alpha v (Salimans & Ho 2022)
    torch.testing.assert_close(to_x0(v, xt, t, vp, "v"), col(abar.sqrt()) * xt - col((1 - abar).sqrt()) * v)
    torch.testing.assert_close(convert_prediction(v, xt, t, vp, "v", "eps"),
                               col((1 - abar).sqrt()) * xt + col(abar.sqrt()) * v)
    # diffusers agrees on x_t and v (it works in float32)
    sched = DDPMScheduler(beta_schedule=schedule)
    torch.testing.assert_close(sched.add_noise(x0.float(), eps.float(), ts), xt.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sched.get_velocity(x0.float(), eps.float(), ts), v.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma_d", [0.5, 1.0])
def test_trigflow_F_is_time_derivative_over_sigma_d(sigma_d):
    trig = TrigFlow(sigma_d)
    tau = torch.linspace(0.03, 1.54, 7, dtype=F64)
    x0, eps = noise((7, 2, 2), 2)
    xt = trig.add_noise(x0, eps, tau)
    F = from_x0(x0, xt, tau, trig, "trigflow", sigma_d)
    h = 1e-6
    dxdt = (trig.add_noise(x0, eps, tau + h) - trig.add_noise(x0, eps, tau - h)) / (2 * h)
    torch.testing.assert_close(F, dxdt / sigma_d, rtol=1e-7, atol=1e-8)
    # F = cos(tau) eps - sin(tau) x0 / sigma_d, and sCM's x0 = cos(tau) x_t - sin(tau) sigma_d F
    torch.testing.assert_close(F, col(torch.cos(tau)) * eps - col(torch.sin(tau)) * x0 / sigma_d)
    torch.testing.assert_close(to_x0(F, xt, tau, trig, "trigflow", sigma_d),
                               col(torch.cos(tau)) * xt - col(torch.sin(tau)) * sigma_d * F)
    # for TrigFlow the process' own velocity is sigma_d F
    torch.testing.assert_close(from_x0(x0, xt, tau, trig, "flow"), sigma_d * F)


def test_trigflow_F_for_other_processes_uses_the_trigflow_time_with_the_same_snr():
    sigma_d = 0.5
    edm = EDM()
    sig = torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=F64)
    tau = torch.atan(sig / sigma_d)
    x0, eps = noise((4, 3), 3)
    xt = edm.add_noise(x0, eps, sig)
    F = from_x0(x0, xt, sig, edm, "trigflow", sigma_d)
    torch.testing.assert_close(F, torch.cos(tau)[:, None] * eps - torch.sin(tau)[:, None] * x0 / sigma_d)


def test_edm_eps_and_velocity_closed_forms():
    edm = EDM()
    sig = torch.tensor([0.05, 1.0, 20.0], dtype=F64)
    x0, eps = noise((3, 4), 4)
    xt = edm.add_noise(x0, eps, sig)
    torch.testing.assert_close(to_x0(eps, xt, sig, edm, "eps"), xt - sig[:, None] * eps)
    # EDM's probability-flow velocity dx/dsigma = eps
    torch.testing.assert_close(from_x0(x0, xt, sig, edm, "flow"), eps)
    torch.testing.assert_close(convert_prediction(eps, xt, sig, edm, "eps", "x0"), x0)


def test_same_type_conversion_is_identity_and_dtypes_follow_the_prediction():
    flow = RectifiedFlow()
    x = noise((2, 3), 5)[0].float()
    pred = noise((2, 3), 6)[0].float()
    t = torch.tensor([0.2, 0.7], dtype=F64)
    for kind in PREDICTION_TYPES:
        assert convert_prediction(pred, x, t, flow, kind, kind) is pred
    out = convert_prediction(pred, x, t, flow, "eps", "v")
    assert out.dtype == torch.float32 and out.shape == x.shape
    # scalar time broadcasts like a per-sample time
    torch.testing.assert_close(convert_prediction(pred, x, 0.2, flow, "eps", "x0"),
                               convert_prediction(pred, x, torch.tensor([0.2, 0.2]), flow, "eps", "x0"))


def test_unknown_prediction_type():
    z = torch.zeros(1, 2)
    with pytest.raises(FewstepError, match="allowed: eps, x0, v, flow, trigflow"):
        convert_prediction(z, z, torch.tensor([0.5]), RectifiedFlow(), "score", "x0")
    with pytest.raises(FewstepError, match="score"):
        convert_prediction(z, z, torch.tensor([0.5]), RectifiedFlow(), "x0", "score")
    with pytest.raises(FewstepError):
        prediction_coeffs("velocity", RectifiedFlow(), torch.tensor([0.5]))
