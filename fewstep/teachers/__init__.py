"""Teacher registry and model loading: built-in names (shipped in fewstep/assets/teachers), a model directory, a
diffusers pipeline (alias such as `sdxl`, hub id, or local pipeline folder; see fewstep.teachers.diffusers), or a
distillation run directory (`load_model`). Everything above this layer loads models through here."""

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


def load_teacher(spec: str | Path, device="cpu", *, resolution=None, dtype=None) -> Denoiser:
    """A built-in teacher by name, a directory holding config.json + model.safetensors, or a diffusers
    text-to-image pipeline (alias, hub id or folder with model_index.json) at `resolution` (N or HxW pixels;
    default: the pipeline's own) with its weights in `dtype` (default: as stored, float32 for most)."""
    from fewstep.teachers.diffusers import DIFFUSERS_ALIASES, diffusers_source, load_diffusers_teacher

    spec_s = str(spec)
    name = canonical_teacher_name(spec_s)
    source = diffusers_source(spec_s) if name not in BUILTIN_TEACHERS else None
    if source is not None:
        return load_diffusers_teacher(spec_s, device, resolution=resolution, dtype=dtype)
    if resolution is not None:
        raise FewstepError(f"--resolution applies to diffusers teachers only, not to {spec_s!r}")
    if name in BUILTIN_TEACHERS:
        path = teacher_path(name)
        if not (path / WEIGHTS).is_file():
            raise FewstepError(f"built-in teacher {name!r} is missing from this installation ({str(path)!r}); "
                               f"reinstall fewstep or train it with `fewstep teacher train`")
        return load_denoiser(path, device)
    path = Path(spec_s)
    if path.is_dir() and (path / CONFIG).is_file():
        return load_denoiser(path, device, dtype=dtype)
    raise FewstepError(f"unknown teacher {spec_s!r}; built-in: {', '.join(BUILTIN_TEACHERS)}; diffusers: "
                       f"{', '.join(DIFFUSERS_ALIASES)}, a hub id (org/name) or a folder with model_index.json; "
                       f"or a directory with {CONFIG} and {WEIGHTS}")


RUN_CONFIG = "config.yaml"  # what marks a distillation run directory (see fewstep.training.run)
RUN_STUDENT = "student"


def is_run_dir(path: str | Path) -> bool:
    """A distillation run directory: config.yaml, and no model config.json of its own."""
    path = Path(str(path))
    return path.is_dir() and not (path / CONFIG).is_file() and (path / RUN_CONFIG).is_file()


def is_diffusers_model(spec: str | Path) -> bool:
    """Whether `spec` names a diffusers pipeline (alias, hub id, pipeline folder) or a model made from one (a student
    directory or a run whose student is one), without loading it."""
    import json

    from fewstep.teachers.diffusers import diffusers_source

    path = Path(str(spec))
    if is_run_dir(path):
        path = path / RUN_STUDENT
    if path.is_dir() and (path / CONFIG).is_file():
        try:
            return json.loads((path / CONFIG).read_text()).get("network", {}).get("type") == "diffusers"
        except (OSError, ValueError, AttributeError):
            return False
    name = canonical_teacher_name(str(spec))
    return name not in BUILTIN_TEACHERS and diffusers_source(str(spec)) is not None


def load_model(spec: str | Path, device="cpu", *, dtype=None, **teacher_options) -> Denoiser:
    """A Denoiser from a built-in teacher name, a model directory (config.json + model.safetensors), a
    diffusers pipeline (alias, hub id or folder; `teacher_options`: resolution), or a distillation run directory
    (its student: the EMA weights when the run kept an EMA).

    `device`: a torch device or cpu | cuda | cuda:N | auto (`fewstep.devices.resolve_device`). `dtype`: None keeps
    the weights as stored (float32 for most); auto | fp32 | bf16 | fp16 or a torch dtype casts them
    (`fewstep.devices.resolve_dtype`: auto is bf16 for diffusers models on CUDA); diffusers pipelines are loaded
    straight in that dtype."""
    from fewstep.devices import resolve_device, resolve_dtype

    device = resolve_device(device)
    if dtype is not None:
        dtype = resolve_dtype(dtype, device, diffusers=is_diffusers_model(spec))
    path = Path(str(spec))
    if is_run_dir(path):
        student = path / RUN_STUDENT
        if not (student / CONFIG).is_file():
            raise FewstepError(f"run {str(path)!r} has no finished student yet (student/ is missing); "
                               f"continue it with `fewstep distill --resume --out {path}`")
        spec = student
    den = load_teacher(spec, device, dtype=dtype, **teacher_options)
    if dtype is not None:  # built-in networks (diffusers pipelines were loaded in it; their students' adapters)
        from fewstep.models.jvp import place_networks

        place_networks([den], dtype=dtype)
    return den


def data_kind(denoiser) -> str:
    """"2d" for point data (shape (D,)), "text2image" for text-conditioned latent models (diffusers teachers),
    "image" otherwise (recipes and defaults are chosen by it)."""
    shape = denoiser.data_shape
    if getattr(denoiser, "cond_kind", None) == "text" and getattr(denoiser, "components", None) is not None:
        return "text2image"
    return "2d" if shape is not None and len(shape) == 1 else "image"


__all__ = ["BUILTIN_TEACHERS", "data_kind", "is_diffusers_model", "is_run_dir", "load_model", "load_teacher",
           "teacher_path"]
