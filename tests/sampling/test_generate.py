"""generate(): batches streamed with per-sample seeds, default labels, progress, no autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.diffusion import RectifiedFlow
from fewstep.errors import FewstepError
from fewstep.models import Denoiser
from fewstep.sampling import generate, noise_for_seeds, sample, sample_seeds


class ClassNet(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(3, 16, generator=g))
        self.w2 = nn.Parameter(torch.randn(16, 2, generator=g) / 4)
        self.emb = nn.Parameter(torch.randn(num_classes + 1, 16, generator=g))

    def forward(self, x, t, cond=None):
        h = torch.cat([x, t[:, None].to(x.dtype)], 1) @ self.w1
        if cond is not None:
            h = h + self.emb[cond]
        return torch.tanh(h) @ self.w2


def class_model():
    return Denoiser(ClassNet(), RectifiedFlow(), "flow", cond_kind="class", num_classes=3, data_shape=(2,))


@pytest.mark.parametrize("solver", ["heun", "dpm++2m", "fewstep"])
def test_samples_do_not_depend_on_the_batch_size(solver):
    den = class_model()
    a, la = generate(den, 6, steps=4, solver=solver, seed=5, batch_size=6)
    b, lb = generate(den, 6, steps=4, solver=solver, seed=5, batch_size=4)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert la.tolist() == lb.tolist() == [0, 1, 2, 0, 1, 2]
    c, _ = generate(den, 6, steps=4, solver=solver, seed=6, batch_size=6)
    assert float((a - c).abs().min()) > 0
    # sample i starts from the noise of seed i
    noise = noise_for_seeds(sample_seeds(5, 0, 6), (2,))
    expected = sample(den, noise, steps=4, solver=solver, cond=la, seeds=sample_seeds(5, 0, 6))
    torch.testing.assert_close(a, expected.detach(), rtol=1e-6, atol=1e-6)


def test_fresh_fewstep_noise_really_is_fresh():
    den = class_model()
    fresh, _ = generate(den, 4, steps=3, solver="fewstep", batch_size=4)
    det, _ = generate(den, 4, steps=3, solver="fewstep", renoise="deterministic", batch_size=4)
    assert float((fresh - det).abs().max()) > 1e-3


def test_labels_guidance_progress_and_no_grad():
    den = class_model()
    ticks = []
    x, labels = generate(den, 5, steps=2, solver="euler", labels=torch.tensor([2, 2, 1, 0, 1]), guidance=3.0,
                         batch_size=2, progress=ticks.append)
    assert ticks == [2, 2, 1] and labels.tolist() == [2, 2, 1, 0, 1]
    assert x.shape == (5, 2) and x.dtype == torch.float32 and not x.requires_grad
    assert den.training  # the mode is restored
    noise = noise_for_seeds(sample_seeds(0, 0, 5), (2,))
    with torch.no_grad():
        ref = sample(den, noise, steps=2, solver="euler", cond=labels, guidance=3.0)
    torch.testing.assert_close(x, ref)
    # per-sample guidance scales are sliced with their batch
    w = torch.tensor([1.0, 3.0, 3.0, 1.0, 3.0])
    xw, _ = generate(den, 5, steps=2, solver="euler", labels=labels, guidance=w, batch_size=2)
    torch.testing.assert_close(xw[w == 3.0], x[w == 3.0])
    assert float((xw[0] - x[0]).abs().max()) > 1e-4


def test_unconditional_model_has_no_labels_and_explicit_timesteps_work():
    den = Denoiser(ClassNet(), RectifiedFlow(), "flow", data_shape=(2,))
    x, labels = generate(den, 3, timesteps=[1.0, 0.5], solver="heun", batch_size=2)
    assert labels is None and x.shape == (3, 2)
    y, _ = generate(den, 3, steps=2, solver="heun")  # uniform 2 steps: the same times
    torch.testing.assert_close(x, y)


def test_bad_arguments_raise():
    den = class_model()
    with pytest.raises(FewstepError, match="unknown solver 'ddpm'"):
        generate(den, 2, solver="ddpm")
    with pytest.raises(FewstepError, match="unknown renoise"):
        generate(den, 2, solver="fewstep", renoise="maybe")
    with pytest.raises(FewstepError, match="3 labels for 2 samples"):
        generate(den, 2, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(FewstepError, match="batch_size"):
        generate(den, 2, batch_size=0)
