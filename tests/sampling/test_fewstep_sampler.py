"""The few-step student sampler: exact on a point mass, DDIM when deterministic, per-sample fresh noise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.diffusion import EDM, RectifiedFlow, TrigFlow, VPDiscrete, from_x0, sampling_timesteps
from fewstep.errors import FewstepError
from fewstep.models import Denoiser
from fewstep.sampling import renoise_for_seeds, sample, sample_fewstep

F64 = torch.float64
POINT = torch.tensor([0.3, -1.2], dtype=F64)
NOISE = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=F64)


class PointMass(nn.Module):
    """The exact prediction of type `kind` for data concentrated at POINT (x0 = POINT everywhere)."""

    def __init__(self, process, kind):
        super().__init__()
        self.process, self.kind = process, kind

    def forward(self, x, t, cond=None):
        return from_x0(POINT.expand_as(x), x, t, self.process, self.kind)


class Smooth(nn.Module):
    def __init__(self, time_scale=1.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w1", torch.randn(3, 16, generator=g, dtype=F64))
        self.register_buffer("w2", torch.randn(16, 2, generator=g, dtype=F64) / 4)
        self.time_scale = time_scale

    def forward(self, x, t, cond=None):
        return torch.tanh(torch.cat([x, t[:, None] * self.time_scale], 1) @ self.w1) @ self.w2


@pytest.mark.parametrize("process, kind", [
    (RectifiedFlow(), "flow"), (VPDiscrete.from_schedule("scaled_linear"), "eps"), (EDM(), "x0"),
    (TrigFlow(), "trigflow"),
], ids=["flow", "vp-eps", "edm-x0", "trigflow-F"])
def test_point_mass_is_recovered_exactly(process, kind):
    den = Denoiser(PointMass(process, kind), process, kind, data_shape=(2,))
    t0 = process.t_max
    torch.testing.assert_close(sample_fewstep(den, NOISE, [t0]), POINT.expand(6, 2))
    t1 = float(process.t_from_ratio(torch.tensor(0.5, dtype=F64)))
    for renoise in ("fresh", "deterministic"):
        out = sample_fewstep(den, NOISE, [t0, t1], renoise=renoise, seeds=list(range(6)))
        torch.testing.assert_close(out, POINT.expand(6, 2))


@pytest.mark.parametrize("process, prediction, ts", [
    (VPDiscrete.from_schedule("scaled_linear"), "eps", [999.0, 700.0, 400.0, 100.0]),
    (RectifiedFlow(), "flow", [1.0, 0.7, 0.3]),
    (EDM(), "v", [80.0, 5.0, 0.5]),
], ids=["vp-eps", "flow", "edm-v"])
def test_deterministic_renoise_is_ddim_which_is_euler(process, prediction, ts):
    den = Denoiser(Smooth(1e-3 if isinstance(process, VPDiscrete) else 1.0), process, prediction, data_shape=(2,))
    a = sample_fewstep(den, NOISE, ts, renoise="deterministic", capture=True)
    b = sample(den, NOISE, timesteps=ts, solver="euler", capture=True)
    torch.testing.assert_close(a.x, b.x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.xs, b.xs, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.x0s, b.x0s, rtol=1e-9, atol=1e-9)


def test_fresh_renoise_draws_new_per_sample_noise():
    process = VPDiscrete.from_schedule("scaled_linear")
    den = Denoiser(Smooth(1e-3), process, "eps", data_shape=(2,))
    ts = [999.0, 500.0, 250.0]
    seeds = [11, 12, 13, 14, 15, 16]
    traj = sample_fewstep(den, NOISE, ts, seeds=seeds, capture=True)
    # x_{t_{i+1}} = alpha x0_i + sigma z with z from each sample's own generator for step i + 1
    a, s = process.alpha(torch.tensor(ts, dtype=F64)), process.sigma(torch.tensor(ts, dtype=F64))
    for i in range(2):
        z = renoise_for_seeds(seeds, i + 1, (2,), dtype=F64)
        torch.testing.assert_close(traj.xs[i + 1], a[i + 1] * traj.x0s[i] + s[i + 1] * z)
    # a sample does not depend on its batch neighbours
    part = sample_fewstep(den, NOISE[2:5], ts, seeds=seeds[2:5])
    torch.testing.assert_close(part, traj.x[2:5])
    # and the fresh path is not the deterministic one
    det = sample_fewstep(den, NOISE, ts, renoise="deterministic")
    assert float((traj.x - det).abs().max()) > 1e-3
    # through sample(solver="fewstep"): fresh by default, deterministic on request
    torch.testing.assert_close(sample(den, NOISE, timesteps=ts, solver="fewstep", seeds=seeds), traj.x)
    torch.testing.assert_close(sample(den, NOISE, timesteps=ts, solver="fewstep", renoise="deterministic"), det)


def test_fewstep_steps_and_spacing_through_sample():
    process = RectifiedFlow()
    den = Denoiser(Smooth(), process, "flow", data_shape=(2,))
    out = sample(den, NOISE, steps=4, spacing="karras", solver="fewstep", renoise="deterministic")
    torch.testing.assert_close(out, sample_fewstep(den, NOISE, sampling_timesteps(process, 4, "karras"),
                                                   renoise="deterministic"))


def test_gradients_flow_through_the_student_sampler():
    net = Smooth()
    w = net.w2.clone().requires_grad_(True)
    net.w2 = w
    den = Denoiser(net, RectifiedFlow(), "flow", data_shape=(2,))
    sample_fewstep(den, NOISE, [1.0, 0.5], seeds=list(range(6))).square().sum().backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


def test_bad_arguments_raise():
    den = Denoiser(Smooth(), RectifiedFlow(), "flow", data_shape=(2,))
    with pytest.raises(FewstepError, match="unknown renoise 'sometimes'; allowed: fresh, deterministic"):
        sample_fewstep(den, NOISE, [1.0, 0.5], renoise="sometimes")
    with pytest.raises(FewstepError, match="3 seeds for a batch of 6"):
        sample_fewstep(den, NOISE, [1.0, 0.5], seeds=[1, 2, 3])
    with pytest.raises(FewstepError, match="decreasing"):
        sample_fewstep(den, NOISE, [0.5, 1.0])


def test_step_count_embedded_students_are_told_the_step_count():
    """sample_fewstep passes n (the length of the time list) to students that take a step count."""
    from fewstep.models.mlp import MLPNet

    seen = []

    class Spy(MLPNet):
        def forward(self, x, t, cond=None, guidance=None, steps=None):
            seen.append(None if steps is None else steps.tolist())
            return super().forward(x, t, cond, guidance, steps)

    den = Denoiser(Spy(dim=2, width=8, depth=1, steps_embed=True), RectifiedFlow(), "flow")
    for ts in ([1.0, 0.5], [1.0, 2 / 3, 1 / 3], [1.0]):
        seen.clear()
        sample_fewstep(den, torch.randn(3, 2), ts, renoise="deterministic")
        assert seen == [[float(len(ts))] * 3] * len(ts)
    plain = Denoiser(Spy(dim=2, width=8, depth=1), RectifiedFlow(), "flow")
    seen.clear()
    sample_fewstep(plain, torch.randn(3, 2), [1.0, 0.5])
    assert seen == [None, None]


def test_ode_solvers_tell_step_count_embedded_students_the_step_count():
    """Euler on a time list is the deterministic few-step path for any student, step-count input included:
    every call of an n-step ODE sampler (Heun's corrector too) passes n."""
    from fewstep.models.mlp import MLPNet
    from fewstep.sampling import sample

    torch.manual_seed(0)
    net = MLPNet(dim=2, width=16, depth=2, steps_embed=True)
    torch.nn.init.normal_(net.embed.steps_mlp[2].weight, std=0.5)  # the step count changes the output
    den = Denoiser(net, RectifiedFlow(), "flow", data_shape=(2,))
    noise = torch.randn(6, 2)
    ts = [1.0, 0.5]
    with torch.no_grad():
        det = sample_fewstep(den, noise, ts, renoise="deterministic")
        euler = sample(den, noise, timesteps=ts, solver="euler")
        told_3 = den(noise, torch.ones(6), steps=3)
        told_2 = den(noise, torch.ones(6), steps=2)
    assert not torch.allclose(told_2, told_3, atol=1e-3)
    torch.testing.assert_close(euler, det, atol=1e-5, rtol=1e-5)
    seen = []
    orig = net.forward

    def spy(x, t, cond=None, guidance=None, steps=None):
        seen.append(None if steps is None else set(steps.tolist()))
        return orig(x, t, cond, guidance, steps)

    net.forward = spy
    with torch.no_grad():
        sample(den, noise, timesteps=[1.0, 2 / 3, 1 / 3], solver="heun")
    assert len(seen) == 5 and all(s == {3.0} for s in seen)  # 3 predictions + 2 corrector calls
