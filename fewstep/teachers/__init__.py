"""Teacher registry: built-in names (shipped in fewstep/assets/teachers) or a model directory."""

from __future__ import annotations

from pathlib import Path

from fewstep.errors import FewstepError
from fewstep.models.denoiser import Denoiser
from fewstep.models.io import CONFIG, WEIGHTS, load_denoiser

BUILTIN_TEACHERS = ("toy:checkerboard", "toy:gaussians8", "toy:moons", "toy:spirals", "digits")
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "teachers"


def canonical_teacher_name(name: str) -> str:
    if f"toy:{name}" in BUILTIN_TEACHERS:
        return f"toy:{name}"
    return name


def teacher_path(name: str) -> Path:
    """The shipped directory of a built-in teacher."""
    name = canonical_teacher_name(name)
    if name not in BUILTIN_TEACHERS:
        raise FewstepError(f"unknown built-in teacher {name!r}; built-in: {', '.join(BUILTIN_TEACHERS)}")
    return ASSETS / name.replace(":", "_")


def load_teacher(spec: str | Path, device="cpu") -> Denoiser:
    """A built-in teacher by name, or a directory holding config.json + model.safetensors."""
    spec_s = str(spec)
    name = canonical_teacher_name(spec_s)
    if name in BUILTIN_TEACHERS:
        path = teacher_path(name)
        if not (path / WEIGHTS).is_file():
            raise FewstepError(f"built-in teacher {name!r} is missing from this installation ({str(path)!r}); "
                               f"reinstall fewstep or train it with `fewstep teacher train`")
        return load_denoiser(path, device)
    path = Path(spec_s)
    if path.is_dir() and (path / CONFIG).is_file():
        return load_denoiser(path, device)
    raise FewstepError(f"unknown teacher {spec_s!r}; built-in: {', '.join(BUILTIN_TEACHERS)}; "
                       f"or a directory with {CONFIG} and {WEIGHTS}")


__all__ = ["BUILTIN_TEACHERS", "load_teacher", "teacher_path"]
