"""FD-digits and the shipped classifier: accuracy, feature space, ordering of real/blurred/noise, coverage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fewstep.data.digits import load_digits_tensors
from fewstep.errors import FewstepError
from fewstep.eval import class_coverage, digits_features, fd_digits, label_accuracy
from fewstep.eval import digits as digits_module
from fewstep.eval import frechet as frechet_module


def blur(x: torch.Tensor, amount: float) -> torch.Tensor:
    """Mix of the image and its 3x3 binomial blur."""
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k[None, None])
    return (1 - amount) * x + amount * blurred


def noise_images(n: int, side: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_shipped_weights_are_small_safetensors_and_accurate():
    assert digits_module.WEIGHTS.stat().st_size < 400_000
    state = load_file(str(digits_module.WEIGHTS))
    assert set(state) == set(digits_module.DigitsClassifier().state_dict())
    x, y = load_digits_tensors("test", 8)
    assert label_accuracy(x, y) >= 0.97
    x16, _ = load_digits_tensors("test", 16)
    assert label_accuracy(x16, y) >= 0.95  # 16x16 inputs are pooled to 8x8 first


def test_features_shape_and_determinism():
    x, _ = load_digits_tensors("test", 8)
    f = digits_features(x)
    assert f.shape == (300, digits_module.FEATURE_DIM) and f.dtype == torch.float64
    torch.testing.assert_close(f[:10], digits_features(x[:10]), rtol=1e-5, atol=1e-4)  # batch-independent


def test_fd_orders_real_blurred_noise():
    xt, _ = load_digits_tensors("test", 8)
    xa, _ = load_digits_tensors("all", 8)
    real = fd_digits(xt)
    blurred = fd_digits(blur(xa, 0.5))
    noise = fd_digits(noise_images(1000))
    assert 0 < real < 0.2 * blurred and blurred < 0.5 * noise, (real, blurred, noise)
    # against an explicit reference: a set against itself is 0, and the default reference is all digits
    assert fd_digits(xt, xt) == pytest.approx(0.0, abs=1e-6)
    assert fd_digits(xa) == pytest.approx(0.0, abs=1e-6)
    assert fd_digits(xt, xa) == pytest.approx(real, rel=1e-9)


def test_fd_default_reference_matches_the_samples_resolution():
    x16, _ = load_digits_tensors("all", 16)
    assert fd_digits(x16) == pytest.approx(0.0, abs=1e-6)  # all digits at 16x16 against the 16x16 reference
    t16, _ = load_digits_tensors("test", 16)
    assert fd_digits(t16) < 0.05 * fd_digits(noise_images(500, 16))


def test_mode_collapse_scores_badly():
    xa, ya = load_digits_tensors("all", 8)
    assert fd_digits(xa[ya == 3]) > 20 * fd_digits(load_digits_tensors("test", 8)[0])


def test_fd_uses_the_shared_frechet_implementation(monkeypatch):
    calls = []
    original = frechet_module.frechet_distance

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(digits_module, "frechet_distance", spy)
    xt, _ = load_digits_tensors("test", 8)
    fd_digits(xt[:50])
    assert calls == [1]


def test_class_coverage_and_label_accuracy():
    x, y = load_digits_tensors("test", 8)
    cov = class_coverage(x)
    assert cov["classes_covered"] == 10 and cov["min_fraction"] > 0.05
    assert sum(cov["per_class"]) == pytest.approx(1.0, abs=1e-4)
    assert cov["entropy"] == pytest.approx(cov["max_entropy"], abs=0.05)
    ones = class_coverage(x[y == 1])
    assert ones["per_class"][1] > 0.9 and ones["classes_covered"] <= 2 and ones["entropy"] < 0.5
    assert label_accuracy(x, (y + 1) % 10) < 0.05  # wrong labels are caught
    with pytest.raises(FewstepError, match="labels"):
        label_accuracy(x, y[:10])


def test_rgb_and_bad_shapes():
    x, _ = load_digits_tensors("test", 16)
    rgb = x.expand(-1, 3, -1, -1)
    assert fd_digits(rgb) == pytest.approx(fd_digits(x), rel=1e-6)
    with pytest.raises(FewstepError, match="square"):
        fd_digits(F.pad(x, (0, 2)))
    with pytest.raises(FewstepError, match="images"):
        fd_digits(torch.zeros(10, 2))
    with pytest.raises(FewstepError, match="at least 2"):
        fd_digits(x[:1])
