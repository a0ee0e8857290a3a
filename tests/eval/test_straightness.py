"""Straightness: 0 for straight flows in any process, the finite-difference definition for a flow model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.diffusion import EDM, RectifiedFlow, VPDiscrete
from fewstep.errors import FewstepError
from fewstep.eval.straightness import straightness, trajectory_straightness
from fewstep.models import Denoiser
from fewstep.sampling import sample
from fewstep.teachers import load_teacher


class ConstantX0(nn.Module):
    """Predicts the same clean point whatever the input: every ODE path is a straight line to it."""

    def __init__(self, point):
        super().__init__()
        self.point = nn.Parameter(torch.as_tensor(point, dtype=torch.float32))

    def forward(self, x, t, cond=None):
        return self.point.expand_as(x)


@pytest.mark.parametrize("process", [RectifiedFlow(), EDM(), VPDiscrete.from_schedule("scaled_linear")],
                         ids=["flow", "edm", "vp"])
def test_a_straight_flow_has_zero_straightness(process):
    den = Denoiser(ConstantX0([0.5, -1.0]), process, "x0", data_shape=(2,))
    assert straightness(den, 64, steps=7) < 1e-10


def test_the_teacher_is_curved_and_matches_the_finite_difference_definition():
    teacher = load_teacher("toy:checkerboard")
    s = straightness(teacher, 256, steps=16)
    assert s > 0.1
    # Liu et al.: the mean over steps of |(z - x) - (x_i - x_{i+1}) / ds|^2 along the Euler path (uniform steps)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traj = sample(teacher, z, steps=16, solver="euler", capture=True)
    xs = traj.xs  # 17 states from noise (s = 1) to the sample
    v = (xs[:-1] - xs[1:]) * 16
    ref = ((v - (xs[0] - xs[-1])) ** 2).mean(dim=(0, 2))
    ours = trajectory_straightness(teacher, z, steps=16)
    torch.testing.assert_close(ours.mean(), ref.mean().double(), rtol=1e-4, atol=1e-7)


def test_class_conditional_model_and_bad_arguments():
    digits = load_teacher("digits")
    assert straightness(digits, 8, steps=4, batch_size=3) > 0
    with pytest.raises(FewstepError, match=">= 1"):
        straightness(digits, 0)
