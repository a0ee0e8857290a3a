"""Training timestep samplers and sampling spacings."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.diffusion import EDM, RectifiedFlow, TrigFlow, VPDiscrete, sample_timesteps, sampling_timesteps
from fewstep.errors import FewstepError

FLOW = RectifiedFlow()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("p", [FLOW, TrigFlow(0.5), EDM(), VPDiscrete.from_schedule()])
@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "lognormal", "u_shaped"])
def test_samplers_stay_in_range_and_are_reproducible(p, kind):
    t = sample_timesteps(2000, p, kind, generator=gen(1))
    assert t.shape == (2000,)
    assert float(t.min()) >= p.t_min - 1e-12 and float(t.max()) <= p.t_max + 1e-12
    torch.testing.assert_close(t, sample_timesteps(2000, p, kind, generator=gen(1)))
    assert not torch.equal(t, sample_timesteps(2000, p, kind, generator=gen(2)))


def test_logit_normal_moments():
    s = sample_timesteps(200_000, FLOW, "logit_normal", mean=0.5, std=0.8, generator=gen())
    z = torch.log(s / (1 - s))
    assert abs(float(z.mean()) - 0.5) < 0.01 and abs(float(z.std()) - 0.8) < 0.01


def test_lognormal_moments_edm_and_trigflow():
    sig = sample_timesteps(200_000, EDM(sigma_min=1e-6, sigma_max=1e6), "lognormal", mean=-1.0, std=1.4,
                           generator=gen())
    assert abs(float(torch.log(sig).mean()) + 1.0) < 0.01 and abs(float(torch.log(sig).std()) - 1.4) < 0.01
    # sCM: sigma = sigma_d tan(t)
    tau = sample_timesteps(200_000, TrigFlow(0.5), "lognormal", mean=-1.0, std=1.4, generator=gen())
    ls = torch.log(0.5 * torch.tan(tau))
    assert abs(float(ls.mean()) + 1.0) < 0.01


def test_u_shaped_is_symmetric_with_heavy_ends():
    s = sample_timesteps(200_000, FLOW, "u_shaped", a=4.0, generator=gen())
    hist = torch.histc(s.float(), bins=10, min=0, max=1)
    assert hist[0] > 2 * hist[5] and hist[-1] > 2 * hist[4]
    assert abs(float(s.mean()) - 0.5) < 0.005
    # the density a cosh(a (s - 1/2)) / (2 sinh(a/2)) integrates to this mass on the first tenth
    a = 4.0
    expected = (math.sinh(a * 0.4) - math.sinh(a * 0.5)) / (2 * math.sinh(a / 2)) * -1
    assert abs(float((s < 0.1).double().mean()) - expected) < 0.005


def test_grid_and_uniform():
    grid = [999.0, 749.0, 499.0, 249.0]
    t = sample_timesteps(4000, VPDiscrete.from_schedule(), "grid", grid=grid, generator=gen())
    assert set(t.tolist()) == set(grid)
    u = sample_timesteps(20_000, FLOW, "uniform", generator=gen())
    assert float(u.min()) < 0.01 and float(u.max()) > 0.99 and abs(float(u.mean()) - 0.5) < 0.01
    with pytest.raises(FewstepError, match="grid"):
        sample_timesteps(3, FLOW, "grid", grid=[])
    with pytest.raises(FewstepError, match="allowed"):
        sample_timesteps(3, FLOW, "beta")


def test_sampling_spacings():
    ts = sampling_timesteps(FLOW, 4, "uniform")
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64))
    vp = VPDiscrete.from_schedule()
    assert sampling_timesteps(vp, 4, "trailing").tolist() == [999.0, 749.0, 499.0, 249.0]
    from diffusers import DDIMScheduler

    d = DDIMScheduler(timestep_spacing="trailing")
    d.set_timesteps(4)
    assert sampling_timesteps(vp, 4, "trailing").tolist() == d.timesteps.double().tolist()
    torch.testing.assert_close(sampling_timesteps(FLOW, 6, "shifted", shift=1.0), sampling_timesteps(FLOW, 6))
    shifted = sampling_timesteps(FLOW, 6, "shifted", shift=3.0)
    assert torch.all(shifted[1:] >= sampling_timesteps(FLOW, 6)[1:])  # shift > 1 spends more steps at high noise
    edm = EDM()
    k = sampling_timesteps(edm, 5, "karras", rho=7.0)
    r = (80 ** (1 / 7) + torch.arange(5, dtype=torch.float64) / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(k, r.double())
    for p in (FLOW, vp, edm, TrigFlow(0.5)):
        for sp in ("uniform", "karras", "trailing", "shifted"):
            t = sampling_timesteps(p, 7, sp)
            assert t.shape == (7,) and torch.all(t[1:] < t[:-1]), (p, sp)
    with pytest.raises(FewstepError):
        sampling_timesteps(FLOW, 0)
    with pytest.raises(FewstepError, match="allowed"):
        sampling_timesteps(FLOW, 3, "cosine")
