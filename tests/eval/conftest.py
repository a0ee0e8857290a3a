"""Shared fixtures for the feature-space metrics: a randomly initialised FID Inception saved as a
pytorch-fid style state dict (the real weights are not available offline), and a few digit images."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def random_inception_state_dict(seed: int = 0, with_counters: bool = False) -> dict:
    """A state dict with pytorch-fid's key names for a random FIDInceptionV3 whose activations keep
    their scale (He-normal convolutions, random BatchNorm affine and running statistics)."""
    from fewstep.eval.inception import FIDInceptionV3

    g = torch.Generator().manual_seed(seed)
    net = FIDInceptionV3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=g))
    state = net.state_dict()
    if not with_counters:  # like a state dict saved before BatchNorm had num_batches_tracked
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return state


@pytest.fixture(scope="session")
def random_state_dict():
    """The `random_inception_state_dict` function (test modules here are not a package)."""
    return random_inception_state_dict


@pytest.fixture(scope="session")
def inception_pth(tmp_path_factory):
    """Path of a random FID Inception state dict (95 MB), written once per test session."""
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(0), path)
    return path


@pytest.fixture(scope="session")
def digit_images():
    """12 real digits (8x8, 1 channel, in [-1, 1]) and 12 others, from scikit-learn's set."""
    from fewstep.data.digits import load_digits_tensors

    x, _ = load_digits_tensors("all", 8)
    return x[:12].clone(), x[100:112].clone()
