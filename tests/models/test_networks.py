import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewstep.errors import FewstepError
from fewstep.models import embeddings
from fewstep.models.mlp import MLPNet
from fewstep.models.networks import build_network
from fewstep.models.unet import UNetNet


def small_unet(**kw):
    cfg = {"in_channels": 1, "base": 8, "mults": (1, 2), "num_classes": 10}
    cfg.update(kw)
    return UNetNet(**cfg)


def test_mlp_shapes_and_null_label():
    torch.manual_seed(0)
    net = MLPNet(dim=2, width=32, depth=2, num_classes=3)
    x, t = torch.randn(5, 2), torch.rand(5)
    labels = torch.tensor([0, 1, 2, 3, 0])
    out = net(x, t, labels)
    assert out.shape == (5, 2)
    # cond=None means the null label (index num_classes)
    assert torch.equal(net(x, t, None), net(x, t, torch.full((5,), 3)))
    # labels change the output
    assert not torch.allclose(net(x, t, torch.zeros(5, dtype=torch.long)), net(x, t, torch.ones(5, dtype=torch.long)))
    # unconditional MLP ignores cond
    plain = MLPNet(dim=3, width=16, depth=1)
    assert plain(torch.randn(4, 3), torch.rand(4)).shape == (4, 3)


def test_mlp_time_scale_resolves_flow_times():
    torch.manual_seed(0)
    net = MLPNet(dim=2, width=32, depth=2, time_scale=1000.0)
    x = torch.randn(1, 2).expand(2, 2)
    out = net(x, torch.tensor([0.50, 0.51]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)


@pytest.mark.parametrize("res,ch,mults", [(8, 1, (1, 2)), (16, 1, (1, 2, 2)), (16, 3, (1, 2)), (8, 3, (1, 1, 2))])
def test_unet_shapes(res, ch, mults):
    torch.manual_seed(0)
    net = small_unet(in_channels=ch, mults=mults)
    x = torch.randn(3, ch, res, res)
    labels = torch.tensor([0, 9, 10])
    assert net(x, torch.rand(3), labels).shape == x.shape


def test_unet_conditioning_and_null_label():
    torch.manual_seed(0)
    net = small_unet()
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    assert torch.equal(net(x, t, None), net(x, t, torch.full((4,), 10)))
    a = net(x, t, torch.zeros(4, dtype=torch.long))
    b = net(x, t, torch.full((4,), 7))
    assert not torch.allclose(a, b)
    uncond = small_unet(num_classes=None)
    assert uncond(x, t, None).shape == x.shape


def test_unet_has_one_attention_block_at_lowest_resolution():
    net = small_unet(mults=(1, 2, 2))
    seen = []
    net.mid_attn.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    net(torch.randn(2, 1, 16, 16), torch.rand(2), None)
    assert seen == [torch.Size([2, 16, 4, 4])]
    assert sum(type(m).__name__ == "SelfAttention" for m in net.modules()) == 1


def test_sinusoidal_embedding_is_fp32_for_bf16_times():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    emb16 = embeddings.sinusoidal_embedding(t.to(torch.bfloat16) * 1000, 64)
    emb32 = embeddings.sinusoidal_embedding(t * 1000, 64)
    assert emb16.dtype == torch.float32
    torch.testing.assert_close(emb16, emb32)


@pytest.mark.parametrize("make", [lambda: MLPNet(dim=2, width=32, depth=2, num_classes=3), lambda: small_unet()])
def test_time_embedding_runs_in_fp32_under_bf16(make, monkeypatch):
    seen = []
    original = embeddings.sinusoidal_embedding

    def spy(t, dim, *a, **k):
        seen.append(t.dtype)
        out = original(t, dim, *a, **k)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(embeddings, "sinusoidal_embedding", spy)
    net = make().to(torch.bfloat16)
    shape = (4, 2) if isinstance(net, MLPNet) else (4, 1, 8, 8)
    x = torch.randn(shape, dtype=torch.bfloat16)
    out = net(x, torch.rand(4), torch.tensor([0, 1, 2, 3]) % 3)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert seen == [torch.float32, torch.float32]
    # bf16 times are scaled in fp32 too
    seen.clear()
    net(x, torch.rand(4).to(torch.bfloat16), None)
    assert seen == [torch.float32, torch.float32]


def test_time_mlp_stays_fp32_under_autocast_and_fp64_times_stay_fp64():
    """The time embedding's MLP runs outside bf16 autocast (sCM/rCM: spikes otherwise); float64 times are
    embedded in float64 (exact fp64 forward-mode derivatives in t)."""
    torch.manual_seed(0)
    emb = embeddings.TimeClassEmbedding(32, num_classes=3)
    t = torch.rand(4)
    ref = emb(t, None, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = emb(t, None, torch.float32)
    torch.testing.assert_close(auto, ref, rtol=0, atol=0)
    t64 = torch.tensor([0.1, 0.2], dtype=torch.float64)
    assert embeddings.sinusoidal_embedding(t64, 16).dtype == torch.float64
    feats = embeddings.sinusoidal_embedding(t64 * 1000, 16)
    torch.testing.assert_close(feats[:, 0], torch.cos(t64 * 1000), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("net", [MLPNet(dim=2, width=16, depth=2, num_classes=4, time_scale=10.0),
                                 small_unet(in_channels=3, mults=(1, 2, 2), num_res=2, heads=2)])
def test_build_network_round_trip(net):
    cfg = net.config()
    again = build_network(cfg)
    assert again.config() == cfg
    again.load_state_dict(net.state_dict())
    shape = (3, 2) if isinstance(net, MLPNet) else (3, 3, 16, 16)
    x, t = torch.randn(shape), torch.rand(3)
    assert torch.equal(net(x, t, None), again(x, t, None))
    # the config is JSON-able and not shared with the network
    import json

    assert json.loads(json.dumps(cfg)) == cfg
    cfg["type"] = "changed"
    assert net.config()["type"] != "changed"


def test_build_network_errors():
    with pytest.raises(FewstepError, match="unknown network type 'resnet'.*mlp, unet"):
        build_network({"type": "resnet"})
    with pytest.raises(FewstepError, match="mlp"):
        build_network({"type": "mlp", "wdth": 3})


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_unet_forward_mode_jvp_through_attention():
    """sCM-style training needs forward-mode JVPs through the UNet (attention under the MATH backend)."""
    torch.manual_seed(0)
    net = small_unet().double()
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    dx = torch.randn_like(x)
    labels = torch.tensor([1, 10])
    with sdpa_kernel(SDPBackend.MATH):
        out, tangent = torch.func.jvp(lambda a, b: net(a, b, labels), (x, t), (dx, torch.ones_like(t)))
    h = 1e-6
    zero = torch.zeros_like(t)
    _, tangent_x = torch.func.jvp(lambda a, b: net(a, b, labels), (x, t), (dx, zero))
    fd_x = (net(x + h * dx, t, labels) - net(x - h * dx, t, labels)) / (2 * h)
    torch.testing.assert_close(tangent_x, fd_x, rtol=1e-5, atol=1e-7)
    # the time embedding is fp32 by design, so the t-direction is checked with a coarser step
    h = 1e-5
    fd_t = (net(x, t + h, labels) - net(x, t - h, labels)) / (2 * h)
    torch.testing.assert_close(tangent - tangent_x, fd_t, rtol=2e-2, atol=2e-2 * fd_t.abs().max().item())


@pytest.mark.parametrize("make", [lambda **kw: MLPNet(dim=2, width=16, depth=2, num_classes=3, **kw),
                                  lambda **kw: small_unet(**kw)], ids=["mlp", "unet"])
def test_step_count_input_starts_at_zero_and_then_separates_step_counts(make):
    """steps_embed (TDM's sampling-steps-aware students): the new input is zero-initialised, so a network with
    the base weights gives the base output for every step count (and without one); once trained, step counts
    differ. The flag is in the config, so the network is rebuilt with it."""
    torch.manual_seed(0)
    base = make()
    net = make(steps_embed=True)
    assert net.config()["steps_embed"] is True and "steps_embed" not in base.config()
    missing, unexpected = net.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all("steps_mlp" in k for k in missing)
    x = torch.randn(4, 2) if isinstance(base, MLPNet) else torch.randn(4, 1, 8, 8)
    t, y = torch.rand(4), torch.tensor([0, 1, 2, 1])
    ref = base(x, t, y)
    for k in (None, torch.full((4,), 1.0), torch.tensor([1.0, 2.0, 3.0, 4.0])):
        assert torch.equal(net(x, t, y, steps=k), ref)
    torch.nn.init.normal_(net.embed.steps_mlp[2].weight, std=0.5)
    one, four = net(x, t, y, steps=torch.full((4,), 1.0)), net(x, t, y, steps=torch.full((4,), 4.0))
    assert not torch.allclose(one, four, atol=1e-4)
    assert torch.equal(net(x, t, y), ref)  # no step count: the base path
    again = build_network(net.config())
    again.load_state_dict(net.state_dict())
    assert torch.equal(again(x, t, y, steps=torch.full((4,), 4.0)), four)
