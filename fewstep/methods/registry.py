"""The method registry: `fewstep distill --method NAME`, `fewstep methods`.

A method registers itself with `@register_method("name")` in its own module. The registry finds the modules
itself: every module of the `fewstep.methods` package (so a new method is one new file there), then the
`fewstep.methods` entry-point group of installed distributions (a method from another package: point an entry
point at its module). No list of method modules is kept by hand.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path

from fewstep.errors import FewstepError
from fewstep.methods.base import DistillMethod, MethodConfig

_REGISTRY: dict[str, type[DistillMethod]] = {}
ENTRY_POINT_GROUP = "fewstep.methods"
_discovered = False


def register_method(name: str):
    """Class decorator: make a method available as `fewstep distill --method NAME`."""

    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def discover_methods() -> None:
    """Import every module of the fewstep.methods package and every `fewstep.methods` entry point once; their
    `@register_method` decorators fill the registry."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = __name__.rsplit(".", 1)[0]  # fewstep.methods, whose folder this module is in
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not take the built-in methods down
            raise FewstepError(f"cannot load the method plugin {ep.name!r} ({ep.value}): {e}") from None


def available_methods() -> list[str]:
    discover_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[DistillMethod]:
    discover_methods()
    if name not in _REGISTRY:
        raise FewstepError(f"unknown method {name!r}; allowed: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_method_config(name: str, values: dict | None) -> MethodConfig:
    """The method's config dataclass from a dict; unknown keys are a one-line error."""
    cls = get_method(name).config_class
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    bad = sorted(set(values) - set(known))
    if bad:
        raise FewstepError(f"unknown option(s) {', '.join(bad)} for method {name!r}; allowed: "
                           f"{', '.join(known) or 'none'}")
    return cls(**values)
