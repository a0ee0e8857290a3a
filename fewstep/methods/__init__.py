"""Distillation methods, one file each, registered by name (`fewstep distill --method NAME`, `fewstep methods`).

`base.py` is the interface, `registry.py` finds the methods (every module here, plus entry points),
`fake_score.py` holds what the distribution-matching family shares.
"""

from __future__ import annotations

from fewstep.methods.base import Batch, DistillMethod, MethodConfig, Phase, Role, RunContext, StepContext
from fewstep.methods.registry import available_methods, build_method_config, get_method, register_method

__all__ = [
    "Batch", "DistillMethod", "MethodConfig", "Phase", "Role", "RunContext", "StepContext", "available_methods",
    "build_method_config", "get_method", "register_method",
]
