import json
import shlex

import pytest
import torch
from safetensors.torch import load_file

from fewstep.errors import FewstepError
from fewstep.teachers import load_teacher
from fewstep.teachers.train import lr_at, main, train_teacher

FAST = {"iters": 30, "batch_size": 64, "lr": 1e-3}


def test_train_toy_writes_a_loadable_teacher(tmp_path):
    calls = []
    out = tmp_path / "moons"
    summary = train_teacher("moons", out, **FAST, progress=lambda *a: calls.append(a))
    assert json.loads(json.dumps(summary)) == summary
    assert summary["data"] == "toy:moons" and summary["iters"] == 30 and summary["out"] == str(out)
    assert summary["params"] > 0 and summary["seconds"] >= 0 and summary["final_loss"] > 0
    assert [c[0] for c in calls] == list(range(1, 31)) and all(c[1] == 30 for c in calls)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    den = load_teacher(out)
    assert den.data_shape == (2,) and den.cond_kind == "none" and den.prediction == "flow"
    meta = den.meta
    assert meta["data"] == "toy:moons" and meta["kind"] == "2d"
    assert meta["default_steps"] == 50 and meta["default_solver"] == "heun"
    assert meta["trained_with"]["iters"] == 30
    args = shlex.split(meta["train_command"])
    assert args[:3] == ["fewstep", "teacher", "train"]
    assert args[args.index("--iters") + 1] == "30" and args[args.index("--data") + 1] == "toy:moons"
    assert shlex.split(meta["train_command_python"])[1:3] == ["-m", "fewstep.teachers.train"]
    with torch.no_grad():
        assert torch.isfinite(den(torch.randn(8, 2), torch.rand(8))).all()


def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "t"
    train_teacher("toy:gaussians8", out, iters=2, batch_size=16)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FewstepError, match="not empty"):
        train_teacher("toy:gaussians8", out, iters=2, batch_size=16, seed=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(FewstepError):
        train_teacher("toy:moons", tmp_path / "file", iters=2)
    assert (tmp_path / "file").read_text() == "x"


def test_same_command_same_weights(tmp_path):
    for name in ("a", "b"):
        train_teacher("toy:spirals", tmp_path / name, iters=5, batch_size=32, seed=3)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_class_conditional_digits(tmp_path):
    summary = train_teacher("digits", tmp_path / "d", iters=2, batch_size=8, cond_dropout=0.5)
    den = load_teacher(tmp_path / "d")
    assert den.cond_kind == "class" and den.num_classes == 10 and den.data_shape == (1, 8, 8)
    assert den.meta["kind"] == "image" and summary["params"] == sum(p.numel() for p in den.parameters())
    with torch.no_grad():
        x0 = den(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2]), guidance=2.0)
    assert x0.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("kw,match", [({"iters": 0}, "--iters"), ({"batch_size": -1}, "--batch-size"),
                                      ({"lr": 0.0}, "--lr"), ({"data": "toy:nope"}, "toy:nope")])
def test_bad_arguments(tmp_path, kw, match):
    args = {"data": "toy:moons", **kw}
    with pytest.raises(FewstepError, match=match):
        train_teacher(args.pop("data"), tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


def test_module_entry_point(tmp_path, capsys):
    main(["--data", "toy:checkerboard", "--out", str(tmp_path / "c"), "--iters", "3", "--batch-size", "16"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["iters"] == 3
    assert load_teacher(tmp_path / "c").meta["trained_with"]["batch_size"] == 16


def test_lr_schedule():
    assert lr_at(0, 1000, 1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(10, 1000, 1.0, warmup=10) == pytest.approx(1.0)
    assert lr_at(999, 1000, 1.0, warmup=10) == pytest.approx(0.05, abs=1e-3)


def test_image_folder_rgb_with_classes(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    train_teacher(str(tmp_path / "imgs"), tmp_path / "t", iters=2, batch_size=4, resolution=16)
    den = load_teacher(tmp_path / "t")
    assert den.data_shape == (3, 16, 16) and den.cond_kind == "class" and den.num_classes == 2
    assert den.net.config()["mults"] == [1, 2, 2]
    assert "--resolution 16" in den.meta["train_command"]


def test_image_mults():
    from fewstep.teachers.train import image_mults

    assert image_mults(8, 8) == [1, 2]
    assert image_mults(16, 16) == [1, 2, 2]
    assert image_mults(32, 32) == [1, 2, 2, 2]
    assert image_mults(20, 20) == [1, 2, 2]
    assert image_mults(7, 7) == [1]
