"""Distillation methods, registered by name (the registry fills up with the distillation engine)."""

from __future__ import annotations

_REGISTRY: dict[str, type] = {}


def register_method(name: str):
    """Class decorator: make a method available as `fewstep distill --method NAME`."""

    def deco(cls):
        _REGISTRY[name] = cls
        return cls

    return deco


def available_methods() -> list[str]:
    return sorted(_REGISTRY)
