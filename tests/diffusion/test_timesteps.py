"""Training timestep samplers and the decreasing time lists samplers run on."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.diffusion import EDM, RectifiedFlow, TrigFlow, VPDiscrete, sample_timesteps, sampling_timesteps
from fewstep.errors import FewstepError

F64 = torch.float64
FLOW = RectifiedFlow()
VP = VPDiscrete.from_schedule("scaled_linear")
PROCESSES = {"flow": FLOW, "trig1": TrigFlow(1.0), "trig0.5": TrigFlow(0.5), "edm": EDM(), "vp": VP}
SAMPLERS = ["uniform", "logit_normal", "lognormal", "u_shaped", "grid"]
N = 20_000  # large enough for ~0.02 accuracy on moments, small enough to be instant


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def draw(p, kind, n=2000, seed=0, **kw):
    if kind == "grid":
        kw.setdefault("grid", [p.t_min, 0.5 * (p.t_min + p.t_max), p.t_max])
    return sample_timesteps(n, p, kind, generator=gen(seed), **kw)


def logit(s):
    return torch.log(s / (1 - s))


# -- training samplers -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("kind", SAMPLERS)
def test_samplers_return_n_times_in_range_and_are_reproducible(name, kind):
    p = PROCESSES[name]
    t = draw(p, kind, seed=1)
    assert t.shape == (2000,) and t.dtype == F64
    assert torch.all(torch.isfinite(t))
    assert float(t.min()) >= p.t_min and float(t.max()) <= p.t_max
    assert torch.equal(t, draw(p, kind, seed=1))
    assert not torch.equal(t, draw(p, kind, seed=2))
    assert draw(p, kind, n=1).shape == (1,)


def test_uniform_covers_the_range_and_respects_bounds():
    for p in (FLOW, EDM(), VP):
        t = draw(p, "uniform", n=N)
        span = p.t_max - p.t_min
        assert float(t.min()) < p.t_min + 0.01 * span and float(t.max()) > p.t_max - 0.01 * span
        assert abs(float(t.mean()) - 0.5 * (p.t_min + p.t_max)) < 0.01 * span
        # every tenth of the range gets about a tenth of the samples
        hist = torch.histc(t, bins=10, min=p.t_min, max=p.t_max) / N
        assert torch.all((hist - 0.1).abs() < 0.015)
    t = draw(FLOW, "uniform", n=N, t_lo=0.2, t_hi=0.6)
    assert float(t.min()) >= 0.2 and float(t.max()) <= 0.6
    assert float(t.min()) < 0.205 and float(t.max()) > 0.595


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.8), (-0.8, 1.6)])
def test_logit_normal_in_flow_time_has_the_right_logit_moments(mean, std):
    s = draw(FLOW, "logit_normal", n=N, mean=mean, std=std)
    z = logit(s)
    assert abs(float(z.mean()) - mean) < 0.04 and abs(float(z.std()) - std) < 0.04


@pytest.mark.parametrize("name", ["trig1", "trig0.5", "edm"])
def test_logit_normal_is_defined_on_flow_time_for_every_process(name):
    """logit of the flow time with the same SNR is log(ratio): its moments match in any process."""
    p = PROCESSES[name]
    t = draw(p, "logit_normal", n=N, mean=0.3, std=0.9)
    z = torch.log(p.ratio(t))
    assert abs(float(z.mean()) - 0.3) < 0.04 and abs(float(z.std()) - 0.9) < 0.04
    # same seed, same underlying normal draw: mapped exactly from the flow samples
    s = draw(FLOW, "logit_normal", n=N, mean=0.3, std=0.9)
    torch.testing.assert_close(p.ratio(t), s / (1 - s), rtol=1e-9, atol=0)


def test_lognormal_edm_and_trigflow_moments():
    sig = draw(EDM(), "lognormal", n=N, mean=-1.2, std=1.2)  # EDM's P_mean, P_std
    ls = torch.log(sig)
    assert abs(float(ls.mean()) + 1.2) < 0.04 and abs(float(ls.std()) - 1.2) < 0.04
    # sCM: sigma = sigma_d tan(t) is lognormal
    tau = draw(TrigFlow(0.5), "lognormal", n=N, mean=-0.4, std=1.4)
    lt = torch.log(0.5 * torch.tan(tau))
    assert abs(float(lt.mean()) + 0.4) < 0.04 and abs(float(lt.std()) - 1.4) < 0.04
    # in EDM the sample is the ratio itself, clamped into [sigma_min, sigma_max]
    wide = draw(EDM(), "lognormal", n=N, mean=0.0, std=4.0)
    assert float(wide.min()) == 0.002 and float(wide.max()) == 80.0


def test_u_shaped_is_symmetric_with_heavy_ends():
    a = 4.0
    s = draw(FLOW, "u_shaped", n=N, a=a)
    hist = torch.histc(s, bins=10, min=0.0, max=1.0) / N
    middle = hist[4:6].mean()
    assert hist[0] > 2.5 * middle and hist[-1] > 2.5 * middle
    assert abs(float(hist[0] - hist[-1])) < 0.015 and abs(float(hist[1] - hist[-2])) < 0.015
    assert abs(float((s < 0.5).double().mean()) - 0.5) < 0.015
    # matches the CDF of the density a cosh(a (s - 1/2)) / (2 sinh(a/2)) everywhere
    for q in (0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95):
        cdf = 0.5 + math.sinh(a * (q - 0.5)) / (2 * math.sinh(a / 2))
        assert abs(float((s < q).double().mean()) - cdf) < 0.015, q
    # larger a puts more mass at the ends
    s8 = draw(FLOW, "u_shaped", n=N, a=8.0)
    assert float(((s8 < 0.1) | (s8 > 0.9)).double().mean()) > float(((s < 0.1) | (s > 0.9)).double().mean())


def test_grid_only_returns_grid_values_and_covers_them_all():
    grid = [999.0, 749.0, 499.0, 249.0]
    t = sample_timesteps(4000, VP, "grid", grid=grid, generator=gen())
    assert set(t.tolist()) == set(grid)
    counts = torch.stack([(t == g).sum() for g in grid]).double() / 4000
    assert torch.all((counts - 0.25).abs() < 0.04)
    # a tensor grid works too
    t2 = sample_timesteps(500, FLOW, "grid", grid=torch.tensor([0.25, 1.0]), generator=gen())
    assert set(t2.tolist()) == {0.25, 1.0}


def test_unknown_sampler_and_empty_grid_raise():
    with pytest.raises(FewstepError, match="grid"):
        sample_timesteps(3, FLOW, "grid", grid=[])
    with pytest.raises(FewstepError, match="grid"):
        sample_timesteps(3, FLOW, "grid")
    with pytest.raises(FewstepError, match="allowed: uniform, logit_normal"):
        sample_timesteps(3, FLOW, "beta")


# -- sampling spacings -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("spacing", ["uniform", "karras", "trailing", "shifted"])
@pytest.mark.parametrize("steps", [1, 2, 4, 7, 50])
def test_spacings_are_decreasing_with_the_right_length(name, spacing, steps):
    p = PROCESSES[name]
    t = sampling_timesteps(p, steps, spacing)
    assert t.shape == (steps,)
    assert torch.all(t[1:] < t[:-1])
    assert float(t.min()) >= p.t_min - 1e-9 and float(t.max()) <= p.t_max + 1e-9


@pytest.mark.parametrize("name", list(PROCESSES))
def test_uniform_spacing_starts_at_t_max(name):
    p = PROCESSES[name]
    t = sampling_timesteps(p, 5, "uniform")
    assert float(t[0]) == p.t_max
    torch.testing.assert_close(t[:-1] - t[1:], torch.full((4,), (p.t_max - p.t_min) / 5, dtype=F64))
    torch.testing.assert_close(sampling_timesteps(FLOW, 4), torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=F64))
    assert float(sampling_timesteps(FLOW, 3, "uniform", t_max=0.6)[0]) == 0.6


def test_trailing_vp_matches_diffusers():
    from diffusers import DDIMScheduler

    assert sampling_timesteps(VP, 4, "trailing").tolist() == [999.0, 749.0, 499.0, 249.0]
    sched = DDIMScheduler(timestep_spacing="trailing")
    for steps in (1, 2, 3, 4, 6, 7, 8, 16, 25, 50):
        sched.set_timesteps(steps)
        assert sampling_timesteps(VP, steps, "trailing").long().tolist() == sched.timesteps.tolist(), steps
    # integer-valued, as the network was trained on integer timesteps
    t = sampling_timesteps(VP, 7, "trailing")
    assert torch.equal(t, torch.round(t))
    # for continuous processes trailing is the uniform spacing
    torch.testing.assert_close(sampling_timesteps(FLOW, 4, "trailing"), sampling_timesteps(FLOW, 4, "uniform"))


def karras(r_hi, r_lo, steps, rho):
    i = torch.arange(steps, dtype=F64) / (steps - 1)
    return (r_hi ** (1 / rho) + i * (r_lo ** (1 / rho) - r_hi ** (1 / rho))) ** rho


@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_karras_ratios_follow_the_rho_formula(rho):
    edm = EDM()
    t = sampling_timesteps(edm, 6, "karras", rho=rho)
    torch.testing.assert_close(t, karras(80.0, 0.002, 6, rho), rtol=1e-12, atol=0)
    # Karras et al. 2022's 18-step EDM schedule starts 80, 57.59, 40.79, ...
    t18 = sampling_timesteps(edm, 18, "karras")
    assert [round(float(x), 2) for x in t18[:3]] == [80.0, 57.59, 40.79]
    # VP: the same spacing between the extreme ratios of the discrete table
    r_hi = float(VP.ratio(torch.tensor(VP.t_max, dtype=F64)))
    r_lo = float(VP.ratio(torch.tensor(VP.t_min, dtype=F64)))
    tv = sampling_timesteps(VP, 6, "karras", rho=rho)
    torch.testing.assert_close(VP.ratio(tv), karras(r_hi, r_lo, 6, rho), rtol=1e-9, atol=0)


def test_karras_for_unbounded_processes_is_decreasing_and_geometric_in_r_to_one_over_rho():
    for p in (FLOW, TrigFlow(0.5)):
        t = sampling_timesteps(p, 8, "karras")
        r = p.ratio(t)
        assert torch.all(r[1:] < r[:-1]) and torch.all(torch.isfinite(r[1:]))
        # interior ratios are equally spaced in r^(1/rho)
        q = r[1:] ** (1 / 7)
        d = q[:-1] - q[1:]
        torch.testing.assert_close(d, torch.full_like(d, float(d.mean())), rtol=1e-8, atol=0)


def test_shifted_spacing():
    for steps in (1, 3, 8):
        torch.testing.assert_close(sampling_timesteps(FLOW, steps, "shifted", shift=1.0),
                                   sampling_timesteps(FLOW, steps, "uniform"), rtol=1e-12, atol=1e-15)
    s = 1.0 - torch.arange(6, dtype=F64) / 6
    torch.testing.assert_close(sampling_timesteps(FLOW, 6, "shifted", shift=3.0), 3 * s / (1 + 2 * s),
                               rtol=1e-12, atol=1e-15)
    # shift > 1 spends more steps at high noise; in other processes, the flow times map through the SNR
    assert torch.all(sampling_timesteps(FLOW, 6, "shifted", shift=3.0)[1:] > sampling_timesteps(FLOW, 6)[1:])
    sf = sampling_timesteps(FLOW, 4, "shifted", shift=3.0)
    tt = sampling_timesteps(TrigFlow(1.0), 4, "shifted", shift=3.0)
    torch.testing.assert_close(tt, torch.atan(sf / (1 - sf)), rtol=1e-12, atol=1e-15)
    # bounded processes spread the shifted flow times over the flow times they can represent
    edm = EDM(sigma_min=1e-3, sigma_max=1e3)
    te = sampling_timesteps(edm, 4, "shifted", shift=3.0)
    lo, hi = 1e-3 / (1 + 1e-3), 1e3 / (1 + 1e3)
    s_edm = lo + (hi - lo) * sf
    torch.testing.assert_close(te, s_edm / (1 - s_edm), rtol=1e-10, atol=0)
    assert float(te[0]) == pytest.approx(1e3)
    # no repeated (clamped) times where flow time 1 is out of reach, and t_max is honoured
    tv = sampling_timesteps(VP, 50, "shifted", shift=3.0)
    assert float(tv[0]) == pytest.approx(VP.t_max) and torch.all(tv[1:] < tv[:-1])
    half = sampling_timesteps(FLOW, 4, "shifted", t_max=0.5)
    torch.testing.assert_close(half, torch.tensor([0.5, 0.375, 0.25, 0.125], dtype=F64))


def test_bad_spacing_arguments_raise():
    with pytest.raises(FewstepError, match="steps"):
        sampling_timesteps(FLOW, 0)
    with pytest.raises(FewstepError, match="allowed: uniform, karras"):
        sampling_timesteps(FLOW, 3, "cosine")
