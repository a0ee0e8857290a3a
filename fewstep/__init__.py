"""fewstep: distill many-step diffusion and flow teachers into 1-4 step students.

The API functions (`fewstep.sample`, `fewstep.distill`, ...; see `fewstep.api`) are imported on first use, so
importing a lower layer (say `fewstep.diffusion`) does not load the layers above it.
"""

from __future__ import annotations

import importlib

from fewstep.errors import FewstepError

__version__ = "0.1.0.dev0"

_API = ("clip_score", "distill", "evaluate_samples", "export", "fid", "list_methods", "list_teachers", "load_model",
        "pairs", "reference_stats", "sample", "train_teacher")

__all__ = ["FewstepError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module("fewstep.api"), name)
        globals()[name] = value
        return value
    try:  # `import fewstep` then `fewstep.api`, `fewstep.sampling`, ...: the submodule
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_API))
