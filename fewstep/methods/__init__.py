"""Distillation methods, registered by name (`fewstep distill --method NAME`, `fewstep methods`)."""

from __future__ import annotations

from fewstep.methods.base import (
    Batch,
    DistillMethod,
    MethodConfig,
    Phase,
    Role,
    RunContext,
    StepContext,
    available_methods,
    build_method_config,
    get_method,
    register_method,
)

__all__ = [
    "Batch", "DistillMethod", "MethodConfig", "Phase", "Role", "RunContext", "StepContext", "available_methods",
    "build_method_config", "get_method", "register_method",
]
