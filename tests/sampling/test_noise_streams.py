"""The "sequential" noise stream (diffusers models): sample i draws its initial noise and then each step's fresh
noise from one generator seeded with its seed, as a stock pipeline does with a list of generators."""

from __future__ import annotations

import pytest
import torch

from fewstep.diffusion.processes import VPDiscrete
from fewstep.errors import FewstepError
from fewstep.models import Denoiser
from fewstep.sampling import generate, sample_seeds
from fewstep.sampling.seeds import noise_from_generators, sample_generators


class Shrink(torch.nn.Module):
    """eps = 0.3 x: a deterministic network, so samples differ only through their noise."""

    def forward(self, x, t, cond=None):
        return 0.3 * x


def _model(stream):
    return Denoiser(Shrink(), VPDiscrete.from_schedule("scaled_linear"), "eps", data_shape=(3, 2, 2),
                    meta={"noise_stream": stream})


def test_generators_are_drawn_in_turn():
    gens = sample_generators([5, 6])
    a = noise_from_generators(gens, (3,))
    b = noise_from_generators(gens, (3,))
    ref5 = torch.Generator().manual_seed(5)
    assert torch.equal(a[0], torch.randn(3, generator=ref5)) and torch.equal(b[0], torch.randn(3, generator=ref5))
    assert not torch.equal(a, b)
    # a (1, ...) draw (a pipeline's per-image randn_tensor) gives the same numbers as a row draw
    assert torch.equal(torch.randn(1, 3, generator=torch.Generator().manual_seed(6))[0], a[1])


def test_sequential_fewstep_sampling_is_the_manual_consistency_loop():
    den = _model("sequential")
    ts = [999.0, 499.0]
    x, _ = generate(den, 3, timesteps=ts, solver="fewstep", seed=2, renoise="fresh")
    proc = den.process
    for i, s in enumerate(sample_seeds(2, 0, 3)):
        g = torch.Generator().manual_seed(s)
        xt = torch.randn(3, 2, 2, generator=g)  # prior std 1 for VP
        for k, t in enumerate(ts):
            t = torch.tensor(t, dtype=torch.float64)
            a, sig = float(proc.alpha(t)), float(proc.sigma(t))
            x0 = (xt - sig * 0.3 * xt) / a  # x0 from eps = 0.3 x_t
            if k + 1 < len(ts):
                tn = torch.tensor(ts[k + 1], dtype=torch.float64)
                xt = float(proc.alpha(tn)) * x0 + float(proc.sigma(tn)) * torch.randn(3, 2, 2, generator=g)
        torch.testing.assert_close(x[i], x0.float(), rtol=1e-5, atol=1e-5)
    # batch-size independent, and different from the hashed stream (the re-noise differs, not the start)
    y, _ = generate(den, 3, timesteps=ts, solver="fewstep", seed=2, batch_size=1)
    torch.testing.assert_close(x, y, rtol=0, atol=0)
    h, _ = generate(_model("hashed"), 3, timesteps=ts, solver="fewstep", seed=2)
    assert not torch.allclose(h, x)
    h1, _ = generate(_model("hashed"), 3, timesteps=ts[:1], solver="fewstep", seed=2)
    x1, _ = generate(den, 3, timesteps=ts[:1], solver="fewstep", seed=2)
    torch.testing.assert_close(h1, x1, rtol=0, atol=0)


def test_bad_stream_and_per_sample_conditions():
    with pytest.raises(FewstepError, match="unknown noise stream"):
        generate(_model("random"), 2, steps=1)
    with pytest.raises(FewstepError, match="conditions for 3 samples, need 2"):
        generate(_model("hashed"), 2, steps=1, cond={"e": torch.zeros(3, 4)})
