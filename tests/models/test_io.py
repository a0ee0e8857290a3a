import json

import pytest
import torch

from fewstep.diffusion import EDM, RectifiedFlow, VPDiscrete
from fewstep.errors import FewstepError
from fewstep.models import Denoiser
from fewstep.models.io import load_denoiser, save_denoiser
from fewstep.models.mlp import MLPNet
from fewstep.models.unet import UNetNet


def mlp_denoiser(process=None, prediction="flow"):
    torch.manual_seed(0)
    net = MLPNet(dim=2, width=16, depth=2, num_classes=3)
    return Denoiser(net, process or RectifiedFlow(), prediction, cond_kind="class", num_classes=3, data_shape=(2,),
                    meta={"data": "toy:moons", "note": [1, 2]})


@pytest.mark.parametrize("process,prediction", [(RectifiedFlow(), "flow"), (EDM(sigma_max=20.0), "x0"),
                                                (VPDiscrete.from_schedule("linear", 100), "eps")])
def test_round_trip_mlp(tmp_path, process, prediction):
    den = mlp_denoiser(process, prediction)
    save_denoiser(den, tmp_path / "m")
    again = load_denoiser(tmp_path / "m")
    assert again.config() == den.config()
    assert again.meta == den.meta
    assert again.process.config() == process.config()
    x = torch.randn(6, 2)
    t = torch.full((6,), 0.5 * (process.t_min + process.t_max))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.equal(den(x, t, labels, guidance=2.0), again(x, t, labels, guidance=2.0))


def test_round_trip_unet_and_files(tmp_path):
    torch.manual_seed(0)
    net = UNetNet(in_channels=1, base=8, mults=(1, 2), num_classes=10)
    den = Denoiser(net, RectifiedFlow(), "flow", cond_kind="class", num_classes=10, data_shape=(1, 8, 8))
    out = save_denoiser(den, tmp_path / "u")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format_version"] == 1
    assert cfg["network"] == net.config()
    assert cfg["denoiser"]["data_shape"] == [1, 8, 8]
    assert (out / "model.safetensors").read_bytes()[8:9] == b"{"  # safetensors header, not a pickle
    again = load_denoiser(out)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    assert torch.equal(den.raw(x, t, torch.tensor([3, 10])), again.raw(x, t, torch.tensor([3, 10])))


def test_saving_over_a_model_replaces_both_files(tmp_path):
    den = mlp_denoiser()
    save_denoiser(den, tmp_path)
    with torch.no_grad():
        for p in den.net.parameters():
            p.add_(1.0)
    save_denoiser(den, tmp_path)
    x, t = torch.randn(3, 2), torch.rand(3)
    assert torch.equal(load_denoiser(tmp_path).raw(x, t), den.raw(x, t))


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(FewstepError, match="nothing.*config.json"):
        load_denoiser(missing)
    save_denoiser(mlp_denoiser(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(b"\x00garbage")
    with pytest.raises(FewstepError, match="model.safetensors"):
        load_denoiser(tmp_path / "m")
    weights.unlink()
    with pytest.raises(FewstepError, match="model.safetensors.*not found"):
        load_denoiser(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(FewstepError, match="config.json"):
        load_denoiser(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(FewstepError, match="config.json"):
        load_denoiser(tmp_path / "m")


def test_weights_that_do_not_match_the_config(tmp_path):
    save_denoiser(mlp_denoiser(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["network"]["width"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FewstepError, match="do not match"):
        load_denoiser(tmp_path)


def test_newer_format_is_refused(tmp_path):
    save_denoiser(mlp_denoiser(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FewstepError, match="format_version 99"):
        load_denoiser(tmp_path)
