import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.models.io import save_denoiser
from fewstep.teachers import BUILTIN_TEACHERS, load_teacher, teacher_path

EXPECTED = {
    "toy:checkerboard": ((2,), "none"),
    "toy:gaussians8": ((2,), "none"),
    "toy:moons": ((2,), "none"),
    "toy:spirals": ((2,), "none"),
    "digits": ((1, 8, 8), "class"),
}


def test_builtin_names():
    assert BUILTIN_TEACHERS == tuple(EXPECTED)


@pytest.mark.parametrize("name", BUILTIN_TEACHERS)
def test_builtin_teacher_loads_and_runs(name):
    den = load_teacher(name)
    shape, cond_kind = EXPECTED[name]
    assert den.data_shape == shape
    assert den.cond_kind == cond_kind
    assert den.process.config() == {"type": "flow"} and den.prediction == "flow"
    assert den.meta["data"] == name
    assert den.meta["default_steps"] == 50 and den.meta["default_solver"] == "heun"
    assert den.meta["train_command"].startswith(f"fewstep teacher train --data {name} ")
    x = torch.randn(4, *shape)
    labels = torch.tensor([0, 3, 9, 10]) if cond_kind == "class" else None
    with torch.no_grad():
        x0 = den(x, torch.full((4,), 0.5), labels, guidance=2.0 if labels is not None else 1.0)
    assert x0.shape == x.shape and torch.isfinite(x0).all()
    files = sorted(p.name for p in teacher_path(name).iterdir())
    assert files == ["config.json", "model.safetensors"]


def test_bare_names_and_paths():
    assert teacher_path("checkerboard") == teacher_path("toy:checkerboard")
    assert teacher_path("toy:spirals").name == "toy_spirals"
    assert load_teacher("moons").meta["data"] == "toy:moons"
    den = load_teacher(teacher_path("toy:gaussians8"))
    assert den.meta["data"] == "toy:gaussians8"


def test_local_directory(tmp_path):
    den = load_teacher("toy:moons")
    save_denoiser(den, tmp_path / "mine")
    again = load_teacher(str(tmp_path / "mine"))
    x, t = torch.randn(3, 2), torch.rand(3)
    assert torch.equal(again.raw(x, t), den.raw(x, t))


@pytest.mark.parametrize("spec", ["nope", "toy:nope", "sd99", "/no/such/dir"])
def test_unknown_teacher(spec, tmp_path):
    with pytest.raises(FewstepError) as e:
        load_teacher(spec)
    msg = str(e.value)
    assert f"unknown teacher '{spec}'" in msg
    assert "toy:checkerboard" in msg and "digits" in msg and "config.json" in msg and "model.safetensors" in msg
    assert "\n" not in msg


def test_directory_without_model_is_unknown(tmp_path):
    with pytest.raises(FewstepError, match="unknown teacher"):
        load_teacher(tmp_path)
    with pytest.raises(FewstepError, match="built-in: toy:checkerboard"):
        teacher_path("mnist")
