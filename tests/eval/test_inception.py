"""The FID Inception: pytorch-fid's key names load strictly, weights are found where users keep them
(or a one-line message says where to put them), resize modes, greyscale, the TorchScript route."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fewstep.errors import FewstepError
from fewstep.eval import inception as inc
from fewstep.eval.inception import (
    PTH_NAME,
    TORCHSCRIPT_NAME,
    FIDInceptionV3,
    InceptionFeatures,
    fid_inception_from_state_dict,
    find_inception_weights,
    inception_input,
    load_fid_inception_state_dict,
)


def test_layout_matches_pytorch_fid_names_and_sizes():
    state = FIDInceptionV3().state_dict()
    # torchvision's Inception3 without AuxLogits, 1008 classes: the layout pytorch-fid's file was saved from
    assert sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var",
                                                                        "num_batches_tracked"))) == 23_850_960
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7dbl_5.conv.weight": (192, 128, 1, 7),
        "Mixed_6e.branch7x7_2.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch3x3dbl_3a.bn.bias": (384,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)
    assert len([k for k in state if k.endswith(".conv.weight")]) == 94


@pytest.mark.parametrize("with_counters", [False, True])
def test_state_dict_loads_strictly(with_counters):
    sd = FIDInceptionV3().state_dict()
    if not with_counters:  # like a state dict saved before BatchNorm had num_batches_tracked
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    net = fid_inception_from_state_dict(sd)
    loaded = net.state_dict()
    for k in ("Conv2d_1a_3x3.conv.weight", "Mixed_6c.branch7x7dbl_3.bn.running_mean", "fc.weight"):
        torch.testing.assert_close(loaded[k], sd[k])
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    # strict: a renamed key or an extra one is refused with one line
    broken = dict(sd)
    broken["Mixed_7c.branch_pool.conv.kernel"] = broken.pop("Mixed_7c.branch_pool.conv.weight")
    with pytest.raises(FewstepError, match="not the FID Inception state dict"):
        fid_inception_from_state_dict(broken)
    with pytest.raises(FewstepError, match="not the FID Inception state dict"):
        fid_inception_from_state_dict({**sd, "AuxLogits.fc.weight": torch.zeros(1)})


def test_state_dict_file_loads_weights_only(inception_pth, tmp_path):
    net = load_fid_inception_state_dict(inception_pth)
    saved = torch.load(inception_pth, weights_only=True)
    torch.testing.assert_close(net.state_dict()["Mixed_5b.branch1x1.conv.weight"],
                               saved["Mixed_5b.branch1x1.conv.weight"])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FewstepError, match="cannot read Inception state dict"):
        load_fid_inception_state_dict(tmp_path / "junk.pth")


def test_forward_gives_pool3_features(inception_pth):
    net = load_fid_inception_state_dict(inception_pth)
    with torch.no_grad():
        f = net(torch.rand(1, 3, 299, 299) * 2 - 1)
        # inputs smaller than 299 still work (fully convolutional up to the global pool)
        g = net(torch.zeros(1, 3, 75, 75))
        logits = net.fc(g)
    assert f.shape == (1, 2048) and g.shape == (1, 2048) and logits.shape == (1, 1008)
    assert torch.isfinite(f).all() and (f >= 0).all() and f.std() > 0  # after ReLU and average pooling


def _isolate_default_locations(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(tmp_path / "dnnlib"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()


def test_missing_weights_message(monkeypatch, tmp_path):
    _isolate_default_locations(monkeypatch, tmp_path)
    with pytest.raises(FewstepError) as e:
        find_inception_weights()
    msg = str(e.value)
    assert "\n" not in msg
    assert PTH_NAME in msg and TORCHSCRIPT_NAME in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert "--inception" in msg
    with pytest.raises(FewstepError, match="does not exist"):
        find_inception_weights(tmp_path / "nope.pth")


def test_weights_found_at_standard_locations(monkeypatch, tmp_path):
    _isolate_default_locations(monkeypatch, tmp_path)
    ts = tmp_path / "tmp" / TORCHSCRIPT_NAME  # clean-fid downloads into the temp dir
    ts.write_bytes(b"x")
    assert find_inception_weights() == ts
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / PTH_NAME).write_bytes(b"x")
    assert find_inception_weights() == hub / PTH_NAME  # torch hub's cache comes first
    (hub / PTH_NAME).unlink()
    (tmp_path / "tmp" / TORCHSCRIPT_NAME).unlink()
    dn = tmp_path / "dnnlib" / "downloads"
    dn.mkdir(parents=True)
    (dn / f"0123abcd_{TORCHSCRIPT_NAME}").write_bytes(b"x")
    assert find_inception_weights() == dn / f"0123abcd_{TORCHSCRIPT_NAME}"


def test_clean_resize_is_pil_bicubic_per_channel_in_float32():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(1, 3, 20, 13), dtype=np.uint8)
    got = inception_input(torch.from_numpy(img), "clean")
    for c in range(3):
        ref = np.asarray(Image.fromarray(img[0, c].astype(np.float32)).resize((299, 299), Image.Resampling.BICUBIC))
        np.testing.assert_allclose(got[0, c].numpy(), (ref.clip(0, 255) - 128.0) / 128.0, rtol=0, atol=1e-6)
    # bicubic overshoots at sharp edges; clean-fid clips to [0, 255], so the input stays in [-1, 255/128 - 1]
    stripes = np.zeros((1, 1, 32, 32), dtype=np.uint8)
    stripes[..., ::2] = 255
    x = inception_input(torch.from_numpy(stripes), "clean")
    assert float(x.min()) == -1.0 and float(x.max()) == pytest.approx(127 / 128)
    # a flat grey 128 image is 0 after normalisation; floats in [-1, 1] are quantised like a PNG
    flat = inception_input(torch.zeros(1, 1, 8, 8), "clean")  # 0.0 -> uint8 128 (round half to even of 127.5)
    assert torch.allclose(flat, torch.zeros_like(flat), atol=1e-6)


def test_legacy_resize_is_bilinear_on_unit_range():
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.integers(0, 256, size=(2, 3, 16, 16), dtype=np.uint8))
    got = inception_input(img, "legacy")
    ref = 2 * F.interpolate(img.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(got, ref)
    with pytest.raises(FewstepError, match="resize"):
        inception_input(img, "bicubic")


@pytest.mark.parametrize("resize", ["clean", "legacy"])
def test_greyscale_is_repeated_to_three_channels(resize):
    grey = torch.rand(2, 1, 8, 8) * 2 - 1
    a = inception_input(grey, resize)
    b = inception_input(grey.repeat(1, 3, 1, 1), resize)
    assert a.shape == (2, 3, 299, 299)
    torch.testing.assert_close(a, b)


class _Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 2048, 4)

    def forward(self, x):
        # (N, 2048, 1, 1) like the real `layers`, cheaply
        return F.adaptive_avg_pool2d(self.proj(F.adaptive_avg_pool2d(x, 4)), 1)


class _TorchScriptStandIn(torch.nn.Module):
    """The interface of inception-2015-12-05.pt that clean-fid uses: a `layers` module on normalised input."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x).flatten(1)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_route(tmp_path):
    torch.manual_seed(0)
    m = _TorchScriptStandIn().eval()
    path = tmp_path / TORCHSCRIPT_NAME
    torch.jit.script(m).save(str(path))
    assert inc.is_torchscript(path)
    images = torch.rand(3, 3, 12, 12) * 2 - 1
    for resize in ("clean", "legacy"):
        ext = InceptionFeatures(path, resize=resize)
        assert ext.protocol["weights_format"] == "torchscript" and ext.protocol["resize"] == resize
        with torch.no_grad():
            expected = m.layers(inception_input(images, resize)).flatten(1).double()
        torch.testing.assert_close(ext(images), expected)


def test_extractor_protocol_and_batching(inception_pth, digit_images):
    x = digit_images[0][:2]
    ext = inc.inception_features(inception_pth, resize="legacy", batch_size=1)
    assert inc.inception_features(inception_pth, resize="legacy", batch_size=1) is ext  # cached while unchanged
    assert ext.protocol["weights_sha256"] == inc.file_sha256(inception_pth)
    assert ext.protocol["weights_format"] == "pytorch-fid state dict" and ext.protocol["feature_dim"] == 2048
    f = ext(x)
    assert f.shape == (2, 2048) and f.dtype == torch.float64
    with torch.no_grad():
        direct = ext.net(inception_input(x, "legacy")).double()
    torch.testing.assert_close(f, direct)  # two batches of 1 agree with one batch of 2
    with pytest.raises(FewstepError, match="non-finite"):
        ext(torch.full((1, 1, 8, 8), float("nan")))


def test_tensorflow_pooling_details():
    """The FID graph's quirks: average pools ignore padding, and Mixed_7c (E_2) max-pools."""
    x = torch.ones(1, 1, 4, 4)
    assert torch.equal(inc._avg_pool_no_pad(x), x)  # counting the padding would give 4/9 at the corners
    y = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(inc.FIDInceptionE_2.pool(inc.FIDInceptionE_2.__new__(inc.FIDInceptionE_2), y),
                               torch.nn.functional.max_pool2d(y, 3, 1, 1))
    e1 = inc.FIDInceptionE_1.pool(inc.FIDInceptionE_1.__new__(inc.FIDInceptionE_1), y)
    torch.testing.assert_close(e1, torch.nn.functional.avg_pool2d(y, 3, 1, 1, count_include_pad=False))
