"""The TrigFlow view of a Denoiser: exact against closed-form Gaussian denoisers in every process and
prediction type, round trips through the native state/time maps, Denoiser.predict(kind="trigflow"), CFG."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewstep.diffusion import EDM, RectifiedFlow, TrigFlow, VPDiscrete
from fewstep.models import Denoiser
from fewstep.models.trigflow import TrigFlowDenoiser
from fewstep.teachers import load_teacher

F64 = torch.float64
C = 0.7  # data std of the Gaussian data N(0, C^2 I)


def gaussian_x0_eps(x, alpha, sigma, c=C):
    """The exact posterior means for Gaussian data: x0 = alpha c^2 / (alpha^2 c^2 + sigma^2) x, eps likewise."""
    var = alpha * alpha * c * c + sigma * sigma
    return (alpha * c * c / var)[:, None] * x, (sigma / var)[:, None] * x


class GaussianNet(nn.Module):
    """The optimal network for Gaussian data, written out per prediction type (no fewstep conversions)."""

    def __init__(self, process, kind, sigma_d=1.0):
        super().__init__()
        self.process, self.kind, self.sigma_d = process, kind, sigma_d

    def forward(self, x, t, cond=None):
        t = t.to(F64)
        a, s = self.process.alpha(t), self.process.sigma(t)
        x0, eps = gaussian_x0_eps(x, a, s)
        if self.kind == "eps":
            return eps
        if self.kind == "x0":
            return x0
        if self.kind == "v":
            return a[:, None] * eps - s[:, None] * x0
        if self.kind == "flow":  # rectified flow velocity eps - x0
            return eps - x0
        if self.kind == "trigflow":  # TrigFlow's own F at its own time
            return torch.cos(t)[:, None] * eps - torch.sin(t)[:, None] * x0 / self.sigma_d
        raise AssertionError(self.kind)


CASES = {
    "flow/flow": (RectifiedFlow(), "flow", 1.0),
    "vp/eps": (VPDiscrete.from_schedule("scaled_linear"), "eps", 1.0),
    "vp/v": (VPDiscrete.from_schedule("squaredcos_cap_v2"), "v", 1.0),
    "edm/x0": (EDM(), "x0", 1.0),
    "edm/eps": (EDM(), "eps", 1.0),
    "trigflow1/trigflow": (TrigFlow(1.0), "trigflow", 1.0),
}


def closed_form_F(x, t, sigma_d):
    x0, eps = gaussian_x0_eps(x, torch.cos(t), sigma_d * torch.sin(t))
    return torch.cos(t)[:, None] * eps - torch.sin(t)[:, None] * x0 / sigma_d


def _times(wrapper, n=7):
    lo, hi = wrapper.time_range()
    return torch.linspace(lo + 1e-3, hi - 1e-3, n, dtype=F64)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sigma_d", [0.5, 1.0])
def test_wrapper_F_is_the_closed_form_trigflow_prediction(case, sigma_d):
    process, kind, native_sd = CASES[case]
    den = Denoiser(GaussianNet(process, kind, native_sd), process, kind, sigma_d=native_sd, data_shape=(3,))
    wrapper = TrigFlowDenoiser(den, sigma_d)
    t = _times(wrapper)
    x = torch.randn(t.shape[0], 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    F = wrapper(x, t)
    torch.testing.assert_close(F, closed_form_F(x, t, sigma_d), rtol=1e-9, atol=1e-10)
    # x0 and velocity follow: x0 = cos t x - sin t sigma_d F, dx/dt = sigma_d F
    x0_exact, _ = gaussian_x0_eps(x, torch.cos(t), sigma_d * torch.sin(t))
    torch.testing.assert_close(wrapper.x0(x, t), x0_exact, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(wrapper.velocity(x, t), sigma_d * F)


@pytest.mark.parametrize("case", list(CASES))
def test_native_state_and_time_round_trip(case):
    process, kind, native_sd = CASES[case]
    den = Denoiser(GaussianNet(process, kind), process, kind, sigma_d=native_sd, data_shape=(3,))
    sigma_d = 0.5
    wrapper = TrigFlowDenoiser(den, sigma_d)
    t = _times(wrapper)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(t.shape[0], 3, dtype=F64, generator=g), torch.randn(t.shape[0], 3, dtype=F64, generator=g)
    x = torch.cos(t)[:, None] * x0 + sigma_d * torch.sin(t)[:, None] * eps
    x_s, s = wrapper.native(x, t)
    # the same x0 and eps in the native process, at the native time with the same noise-to-signal ratio
    torch.testing.assert_close(x_s, process.add_noise(x0, eps, s), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(process.ratio(s), sigma_d * torch.tan(t), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(wrapper.trigflow_time(s), t, rtol=1e-10, atol=1e-12)
    # the wrapper's x0 is the wrapped model's own x0 at the native state (one function, two parametrisations)
    torch.testing.assert_close(wrapper.x0(x, t), den(x_s, s), rtol=1e-10, atol=1e-10)


def test_time_range_follows_the_native_process():
    flow = TrigFlowDenoiser(Denoiser(GaussianNet(RectifiedFlow(), "flow"), RectifiedFlow(), "flow"), 0.5)
    assert flow.time_range() == (0.0, math.pi / 2)
    edm = TrigFlowDenoiser(Denoiser(GaussianNet(EDM(), "x0"), EDM(), "x0"), 0.5)
    lo, hi = edm.time_range()
    assert lo == pytest.approx(math.atan(0.002 / 0.5)) and hi == pytest.approx(math.atan(80 / 0.5))


def test_matches_denoiser_predict_trigflow_and_guidance_is_linear():
    teacher = load_teacher("digits").double()
    teacher.sigma_d = 0.5  # Denoiser.predict(kind="trigflow") uses the denoiser's sigma_d
    wrapper = TrigFlowDenoiser(teacher, 0.5)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1, 8, 8, dtype=F64, generator=g)
    t = torch.tensor([0.1, 0.6, 1.0, 1.5], dtype=F64)
    y = torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        x_s, s = wrapper.native(x, t)
        torch.testing.assert_close(wrapper(x, t, y), teacher.predict(x_s, s, y, kind="trigflow"), rtol=1e-10,
                                   atol=1e-10)
        cond, uncond = wrapper(x, t, y), wrapper(x, t, None)
        for w in (2.0, torch.tensor([1.0, 1.5, 2.0, 3.0], dtype=F64)):
            wb = w[:, None, None, None] if isinstance(w, torch.Tensor) else w
            torch.testing.assert_close(wrapper(x, t, y, w), uncond + wb * (cond - uncond), rtol=1e-9, atol=1e-9)


def test_a_half_precision_model_is_called_in_its_own_dtype():
    teacher = load_teacher("toy:checkerboard")
    half = load_teacher("toy:checkerboard").to(torch.bfloat16)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    t = torch.linspace(0.05, 1.5, 64, dtype=F64)
    with torch.no_grad():
        ref, out = TrigFlowDenoiser(teacher, 1.0)(x, t), TrigFlowDenoiser(half, 1.0)(x, t)
    assert out.dtype == torch.float32
    assert float((out - ref).norm() / ref.norm()) < 0.05  # bf16 weights and activations


def test_sigma_d_must_be_positive():
    with pytest.raises(ValueError, match="sigma_d"):
        TrigFlowDenoiser(load_teacher("toy:checkerboard"), 0.0)
