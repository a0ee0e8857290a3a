"""ode_solve: the teacher ODE between two given times (what consistency distillation steps with)."""

import pytest
import torch

from fewstep.diffusion import RectifiedFlow, VPDiscrete
from fewstep.errors import FewstepError
from fewstep.models import Denoiser
from fewstep.sampling import ode_solve, resolve_timesteps, sample
from fewstep.teachers import load_teacher


class Linear(torch.nn.Module):
    """eps prediction eps_hat = a * x (an exactly solvable model)."""

    def __init__(self, a=0.7):
        super().__init__()
        self.a = a

    def forward(self, x, t, cond=None):
        return self.a * x


@pytest.mark.parametrize("solver", ["euler", "heun", "dpm++2m"])
def test_whole_path_equals_sample(solver):
    den = load_teacher("toy:checkerboard").double()
    noise = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ts = resolve_timesteps(den.process, 6)
    with torch.no_grad():
        ref = sample(den, noise, timesteps=ts, solver=solver)
        x = noise * float(den.process.prior_std(ts[0]))
        got = ode_solve(den, x, torch.cat([ts, torch.zeros(1, dtype=torch.float64)]), solver=solver)
    assert torch.allclose(got, ref, atol=1e-10)


def test_split_path_composes_and_per_sample_times_match_scalar_times():
    den = Denoiser(Linear(), VPDiscrete.from_schedule("scaled_linear"), "eps", data_shape=(3,)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        one = ode_solve(den, x, [900.0, 500.0, 100.0], solver="euler")
        two = ode_solve(den, ode_solve(den, x, [900.0, 500.0], solver="euler"), [500.0, 100.0], solver="euler")
        assert torch.allclose(one, two, atol=1e-12)
        his = torch.tensor([900.0, 700.0, 500.0, 300.0, 100.0], dtype=torch.float64)
        los = his - 60.0
        batched = ode_solve(den, x, torch.stack([his, los]), solver="heun")
        for i in range(5):
            single = ode_solve(den, x[i:i + 1], [float(his[i]), float(los[i])], solver="heun")
            assert torch.allclose(batched[i:i + 1], single, atol=1e-12)


def test_heun_step_is_second_order():
    # the flow ODE of eps_hat = a x_t under rectified flow has a smooth solution: halving h cuts the error ~4x
    den = Denoiser(Linear(0.3), RectifiedFlow(), "eps", data_shape=(2,)).double()
    x = torch.ones(1, 2, dtype=torch.float64)
    with torch.no_grad():
        fine = ode_solve(den, x, torch.linspace(0.9, 0.3, 4001, dtype=torch.float64), solver="heun")
        errs = [float((ode_solve(den, x, torch.linspace(0.9, 0.3, n + 1, dtype=torch.float64), solver="heun")
                       - fine).abs().max()) for n in (4, 8)]
    assert 3.0 < errs[0] / errs[1] < 5.0


def test_bad_times_are_refused():
    den = load_teacher("toy:checkerboard")
    x = torch.zeros(2, 2)
    with pytest.raises(FewstepError, match="decreasing"):
        ode_solve(den, x, [0.2, 0.5])
    with pytest.raises(FewstepError, match="only the last time may be clean"):
        ode_solve(den, x, [0.5, 0.0, -0.1])
    with pytest.raises(FewstepError, match="ODE solver"):
        ode_solve(den, x, [0.5, 0.2], solver="fewstep")
