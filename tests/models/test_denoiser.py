"""The Denoiser: predictions of every type, classifier-free guidance, null conditions."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fewstep.diffusion import PREDICTION_TYPES, RectifiedFlow, VPDiscrete, convert_prediction
from fewstep.models import Denoiser


class CountingNet(nn.Module):
    """A linear conditional net that counts its calls and batch sizes."""

    def __init__(self, dim=3, num_classes=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(num_classes + 1, dim, generator=g, dtype=torch.float64))
        self.calls = []

    def forward(self, x, t, cond=None):
        self.calls.append(x.shape[0])
        out = x @ self.w + t[:, None] * 0.3
        if cond is not None:
            out = out + self.c[cond]
        return out


@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
@pytest.mark.parametrize("process", [RectifiedFlow(), VPDiscrete.from_schedule()], ids=["flow", "vp"])
def test_predict_agrees_with_conversions(prediction, process):
    net = CountingNet()
    den = Denoiser(net, process, prediction, cond_kind="class", num_classes=4)
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.full((5,), 0.4 * process.t_max + 0.1, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])
    raw = den.raw(x, t, y)
    for kind in PREDICTION_TYPES:
        torch.testing.assert_close(den.predict(x, t, y, kind=kind),
                                   convert_prediction(raw, x, t, process, prediction, kind))


def test_cfg_formula_and_call_counts():
    net = CountingNet()
    den = Denoiser(net, RectifiedFlow(), "flow", cond_kind="class", num_classes=4)
    x = torch.randn(6, 3, dtype=torch.float64)
    t = torch.full((6,), 0.6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    net.calls.clear()
    x0_c = den(x, t, y)
    assert net.calls == [6]  # guidance 1: one plain call
    x0_u = den(x, t, den.null_condition(6))
    net.calls.clear()
    x0_g = den(x, t, y, guidance=3.0)
    assert net.calls == [12]  # one batched call of 2B
    torch.testing.assert_close(x0_g, x0_u + 3.0 * (x0_c - x0_u))
    w = torch.tensor([1.0, 2.0, 0.0, 4.0, 1.5, 7.0], dtype=torch.float64)
    x0_w = den(x, t, y, guidance=w)
    torch.testing.assert_close(x0_w, x0_u + w[:, None] * (x0_c - x0_u))


def test_null_condition_and_unconditional_models():
    net = CountingNet()
    den = Denoiser(net, RectifiedFlow(), "flow", cond_kind="class", num_classes=4)
    assert den.null_condition(3).tolist() == [4, 4, 4]
    x = torch.randn(3, 3, dtype=torch.float64)
    t = torch.full((3,), 0.5, dtype=torch.float64)
    torch.testing.assert_close(den(x, t, None), den(x, t, den.null_condition(3)))

    class Echo(nn.Module):
        def forward(self, x, t, cond=None):
            return x

    plain = Denoiser(Echo(), RectifiedFlow(), "x0")
    torch.testing.assert_close(plain(x, t, None, guidance=5.0), x)  # guidance ignored without conditioning


def test_text_null_condition_broadcasts():
    null = {"emb": torch.zeros(1, 7, 16), "pooled": torch.ones(1, 32)}
    den = Denoiser(nn.Identity(), RectifiedFlow(), "flow", cond_kind="text", null_cond=null)
    c = den.null_condition(5)
    assert c["emb"].shape == (5, 7, 16) and c["pooled"].shape == (5, 32)


def test_config_is_json():
    den = Denoiser(CountingNet(), VPDiscrete.from_schedule(), "v", cond_kind="class", num_classes=4,
                   data_shape=(3,), meta={"data": "x"})
    cfg = json.loads(json.dumps(den.config()))
    assert cfg["prediction"] == "v" and cfg["process"]["type"] == "vp" and cfg["data_shape"] == [3]
