"""The Denoiser: predictions of every type, classifier-free guidance, null conditions, config."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fewstep.diffusion import (
    EDM,
    PREDICTION_TYPES,
    RectifiedFlow,
    TrigFlow,
    VPDiscrete,
    convert_prediction,
    process_from_config,
    to_x0,
)
from fewstep.errors import FewstepError
from fewstep.models import Denoiser, cat_conds, cond_batch_size

F64 = torch.float64
NUM_CLASSES = 4
DIM = 3

PROCESSES = {
    "flow": RectifiedFlow(),
    "trig0.5": TrigFlow(0.5),
    "edm": EDM(),
    "vp": VPDiscrete.from_schedule("scaled_linear"),
}


class LinearNet(nn.Module):
    """out = x W + t b + E[label] (no label term for cond None); records every call."""

    def __init__(self, num_classes=NUM_CLASSES, dim=DIM, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(0.5 * torch.randn(dim, dim, generator=g, dtype=F64))
        self.b = nn.Parameter(torch.randn(dim, generator=g, dtype=F64))
        self.emb = nn.Parameter(torch.randn(num_classes + 1, dim, generator=g, dtype=F64))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, object]] = []

    def forward(self, x, t, cond=None):
        self.calls.append((x.clone(), t.clone(), None if cond is None else cond.clone()))
        out = x @ self.w.to(x.dtype) + t[:, None] * self.b.to(x.dtype)
        if cond is not None:
            out = out + self.emb[cond].to(x.dtype)
        return out

    @property
    def batch_sizes(self):
        return [c[0].shape[0] for c in self.calls]


class TextNet(nn.Module):
    """A text-conditioned linear net: adds the mean token embedding and the pooled vector."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, cond):
        self.calls.append(cond)
        return 0.5 * x + cond["emb"].mean(dim=1)[:, :DIM] + cond["pooled"][:, :DIM]


def mid_times(p, b):
    """Distinct per-sample times well inside the process' range."""
    u = torch.linspace(0.2, 0.8, b, dtype=F64)
    if isinstance(p, EDM):
        return 0.05 * (400.0 ** u)
    return p.t_min + u * (p.t_max - p.t_min)


def batch(b=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, DIM, generator=g, dtype=F64)
    y = torch.randint(0, NUM_CLASSES, (b,), generator=g)
    return x, y


def make(prediction, process, net=None, **kw):
    kw.setdefault("cond_kind", "class")
    if kw["cond_kind"] == "class":
        kw.setdefault("num_classes", NUM_CLASSES)
    sigma_d = getattr(process, "sigma_d", 1.0)
    return Denoiser(net or LinearNet(), process, prediction, sigma_d=sigma_d, **kw)


# -- predictions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pname", list(PROCESSES))
@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
def test_predict_agrees_with_convert_prediction(prediction, pname):
    p = PROCESSES[pname]
    den = make(prediction, p)
    x, y = batch()
    t = mid_times(p, 5)
    raw = den.net(x, t, y)
    for kind in PREDICTION_TYPES:
        expected = convert_prediction(raw, x, t, p, prediction, kind, den.sigma_d)
        torch.testing.assert_close(den.predict(x, t, y, kind=kind), expected, rtol=1e-10, atol=1e-10, msg=kind)
    x0 = to_x0(raw, x, t, p, prediction, den.sigma_d)
    torch.testing.assert_close(den(x, t, y), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(den.predict(x, t, y), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(den.raw(x, t, y), raw)
    # guided predictions of any type are the conversions of the guided raw output
    w = 2.5
    raw_u = den.net(x, t, torch.full_like(y, NUM_CLASSES))
    guided_raw = raw_u + w * (raw - raw_u)
    for kind in PREDICTION_TYPES:
        expected = convert_prediction(guided_raw, x, t, p, prediction, kind, den.sigma_d)
        torch.testing.assert_close(den.predict(x, t, y, guidance=w, kind=kind), expected, rtol=1e-9, atol=1e-9)


def test_scalar_time_is_expanded_to_the_batch_in_the_input_dtype():
    net = LinearNet()
    den = make("eps", RectifiedFlow(), net)
    x, y = batch(4)
    out_scalar = den(x, 0.3, y)
    out_float32_t = den(x, torch.tensor(0.3, dtype=torch.float32), y)
    out_vec = den(x, torch.full((4,), 0.3, dtype=F64), y)
    torch.testing.assert_close(out_scalar, out_vec)
    torch.testing.assert_close(out_float32_t, out_vec, rtol=1e-6, atol=1e-6)
    _, t_seen, _ = net.calls[0]
    assert t_seen.shape == (4,) and t_seen.dtype == x.dtype
    xf = x.float()
    net.calls.clear()
    assert den(xf, 0.3, y).dtype == torch.float32
    assert net.calls[0][1].dtype == torch.float32


# -- classifier-free guidance ------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
@pytest.mark.parametrize("pname", ["flow", "vp"])
def test_cfg_matches_the_manual_formula_scalar_and_per_sample(prediction, pname):
    p = PROCESSES[pname]
    den = make(prediction, p)
    x, y = batch(6)
    t = mid_times(p, 6)
    null = torch.full_like(y, NUM_CLASSES)
    x0_c = to_x0(den.net(x, t, y), x, t, p, prediction)
    x0_u = to_x0(den.net(x, t, null), x, t, p, prediction)
    for w in (0.0, 1.0, 3.0, 7.5):
        torch.testing.assert_close(den(x, t, y, guidance=w), x0_u + w * (x0_c - x0_u), rtol=1e-9, atol=1e-9)
    ws = torch.tensor([1.0, 2.0, 0.0, 4.0, 1.5, 7.0], dtype=F64)
    torch.testing.assert_close(den(x, t, y, guidance=ws), x0_u + ws[:, None] * (x0_c - x0_u), rtol=1e-9,
                               atol=1e-9)
    # a float32 (B,) guidance tensor works with float64 data
    torch.testing.assert_close(den(x, t, y, guidance=ws.float()), x0_u + ws[:, None] * (x0_c - x0_u), rtol=1e-6,
                               atol=1e-6)
    # a 0-dim tensor is a scalar guidance
    torch.testing.assert_close(den(x, t, y, guidance=torch.tensor(3.0)), den(x, t, y, guidance=3.0))


def test_guidance_one_is_one_call_and_guided_is_one_batched_call():
    net = LinearNet()
    den = make("flow", RectifiedFlow(), net)
    x, y = batch(6)
    t = torch.full((6,), 0.6, dtype=F64)
    den(x, t, y)
    den(x, t, y, guidance=1.0)
    den(x, t, y, guidance=1)
    assert net.batch_sizes == [6, 6, 6]
    assert all(torch.equal(c[2], y) for c in net.calls)
    net.calls.clear()
    den(x, t, y, guidance=3.0)
    assert net.batch_sizes == [12]
    xs, ts, conds = net.calls[0]
    # conditional half first with the given labels, unconditional half with the null label num_classes
    assert torch.equal(xs, torch.cat([x, x])) and torch.equal(ts, torch.cat([t, t]))
    assert torch.equal(conds, torch.cat([y, torch.full((6,), NUM_CLASSES)]))
    net.calls.clear()
    den(x, t, y, guidance=torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0, 1.0]))
    assert net.batch_sizes == [12]
    net.calls.clear()
    den.predict(x, t, y, guidance=4.0, kind="eps")
    assert net.batch_sizes == [12]


def test_null_label_is_num_classes():
    den = make("x0", RectifiedFlow(), num_classes=10, net=LinearNet(num_classes=10))
    null = den.null_condition(3)
    assert null.dtype == torch.long and null.tolist() == [10, 10, 10]
    assert den.conditional


def test_cond_none_on_a_conditional_model_uses_the_null_condition():
    net = LinearNet()
    den = make("eps", VPDiscrete.from_schedule(), net)
    x, _ = batch(3)
    t = torch.tensor([100.0, 500.0, 900.0], dtype=F64)
    out = den(x, t, None)
    assert net.batch_sizes == [3]
    assert torch.equal(net.calls[0][2], torch.full((3,), NUM_CLASSES))
    torch.testing.assert_close(out, den(x, t, den.null_condition(3)))
    # guidance has nothing to contrast without a condition: still one plain call
    net.calls.clear()
    torch.testing.assert_close(den(x, t, None, guidance=5.0), out)
    assert net.batch_sizes == [3]
    torch.testing.assert_close(den.raw(x, t), net(x, t, torch.full((3,), NUM_CLASSES)))


def test_unconditional_model_ignores_cond_and_guidance():
    net = LinearNet()
    den = make("x0", RectifiedFlow(), net, cond_kind="none")
    x, y = batch(3)
    t = torch.full((3,), 0.5, dtype=F64)
    assert not den.conditional and den.null_condition(3) is None
    out = den(x, t, None, guidance=5.0)
    torch.testing.assert_close(out, x @ net.w + t[:, None] * net.b)
    assert net.batch_sizes == [1 * 3] and net.calls[0][2] is None


def test_text_conditioning_cfg_with_dict_conditions():
    net = TextNet()
    null = {"emb": torch.zeros(1, 7, 16, dtype=F64), "pooled": torch.full((1, 32), 0.5, dtype=F64)}
    den = Denoiser(net, RectifiedFlow(), "x0", cond_kind="text", null_cond=null)
    c = den.null_condition(5)
    assert c["emb"].shape == (5, 7, 16) and c["pooled"].shape == (5, 32)
    g = torch.Generator().manual_seed(3)
    cond = {"emb": torch.randn(2, 7, 16, generator=g, dtype=F64), "pooled": torch.randn(2, 32, generator=g,
                                                                                           dtype=F64)}
    assert cond_batch_size(cond) == 2 and cond_batch_size(None) is None
    x = torch.randn(2, DIM, generator=g, dtype=F64)
    t = torch.tensor([0.3, 0.7], dtype=F64)
    x0_c = net(x, t, cond)
    x0_u = net(x, t, den.null_condition(2))
    net.calls.clear()
    torch.testing.assert_close(den(x, t, cond, guidance=4.0), x0_u + 4.0 * (x0_c - x0_u))
    assert len(net.calls) == 1 and net.calls[0]["emb"].shape[0] == 4
    torch.testing.assert_close(den(x, t, None), x0_u)
    # a plain tensor null condition broadcasts too
    den2 = Denoiser(nn.Identity(), RectifiedFlow(), "x0", cond_kind="text", null_cond=torch.ones(1, 4, 8))
    assert den2.null_condition(3).shape == (3, 4, 8)
    both = cat_conds(cond, den.null_condition(2))
    assert both["pooled"].shape == (4, 32) and cat_conds(None, None) is None


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pname", list(PROCESSES) + ["vp-table"])
def test_config_is_json_serialisable_and_rebuilds_the_process(pname):
    if pname == "vp-table":
        p = VPDiscrete(torch.cumprod(1 - torch.linspace(1e-3, 0.05, 20, dtype=F64), 0))
    else:
        p = PROCESSES[pname]
    den = make("v", p, data_shape=(3,), meta={"data": "toy"})
    cfg = json.loads(json.dumps(den.config()))
    assert cfg == den.config()
    assert cfg["prediction"] == "v" and cfg["cond_kind"] == "class" and cfg["num_classes"] == NUM_CLASSES
    assert cfg["data_shape"] == [3] and cfg["sigma_d"] == den.sigma_d
    assert process_from_config(cfg["process"]).config() == p.config()
    plain = Denoiser(LinearNet(), RectifiedFlow(), "flow")
    assert json.loads(json.dumps(plain.config()))["data_shape"] is None


def test_bad_arguments_raise():
    with pytest.raises(FewstepError, match="allowed"):
        Denoiser(LinearNet(), RectifiedFlow(), "score")
    with pytest.raises(ValueError, match="cond_kind"):
        Denoiser(LinearNet(), RectifiedFlow(), "x0", cond_kind="image")
    den = make("x0", RectifiedFlow())
    x, y = batch(2)
    with pytest.raises(FewstepError):
        den.predict(x, 0.5, y, kind="score")


def test_time_reaches_the_network_in_at_least_fp32():
    """bf16 would round t (a step of ~0.002 near 0.5) before the network's fp32 time embedding."""
    seen = {}

    class Probe(nn.Module):
        def forward(self, x, t, cond=None):
            seen["dtype"], seen["t"] = t.dtype, t
            return x

    den = Denoiser(Probe(), RectifiedFlow(), "flow")
    den.raw(torch.zeros(2, 3, dtype=torch.bfloat16), torch.tensor([0.5012, 0.2503]))
    assert seen["dtype"] == torch.float32
    torch.testing.assert_close(seen["t"], torch.tensor([0.5012, 0.2503]))
    den.raw(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0.5, 0.25], dtype=torch.float64))
    assert seen["dtype"] == torch.float64


def test_step_count_reaches_only_step_count_embedded_networks_and_both_cfg_branches():
    """`steps` goes to networks built with steps_embed (through the conditional and unconditional halves of a
    CFG call, per sample), and is ignored by others."""
    from fewstep.diffusion import RectifiedFlow
    from fewstep.models.mlp import MLPNet

    torch.manual_seed(0)
    net = MLPNet(dim=2, width=16, depth=2, num_classes=3, steps_embed=True)
    torch.nn.init.normal_(net.embed.steps_mlp[2].weight, std=0.5)
    den = Denoiser(net, RectifiedFlow(), "flow", cond_kind="class", num_classes=3)
    plain = Denoiser(MLPNet(dim=2, width=16, depth=2, num_classes=3), RectifiedFlow(), "flow", cond_kind="class",
                     num_classes=3)
    assert den.steps_embedded and not plain.steps_embedded
    x, t, y = torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 0])
    assert torch.equal(plain(x, t, y, steps=3), plain(x, t, y))
    ks = torch.tensor([1, 2, 3, 4])
    guided = den(x, t, y, guidance=2.0, steps=ks)
    c = to_x0(net(x, t, y, steps=ks.float()), x, t, den.process, "flow")
    u = to_x0(net(x, t, torch.full((4,), 3), steps=ks.float()), x, t, den.process, "flow")
    torch.testing.assert_close(guided, u + 2.0 * (c - u))
    assert not torch.allclose(den(x, t, y, steps=1), den(x, t, y, steps=4))
    torch.testing.assert_close(den(x, t, y, steps=2), den(x, t, y, steps=torch.full((4,), 2)))
    # a one-element step count tensor is every sample's, in both CFG halves too
    torch.testing.assert_close(den(x, t, y, guidance=2.0, steps=torch.tensor([3])),
                               den(x, t, y, guidance=2.0, steps=3))
