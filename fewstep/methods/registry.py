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
import warnings
from pathlib import Path

from fewstep.errors import FewstepError
from fewstep.methods.base import DistillMethod, MethodConfig

_REGISTRY: dict[str, type[DistillMethod]] = {}
_BROKEN: dict[str, str] = {}  # entry points that failed to load -> why
ENTRY_POINT_GROUP = "fewstep.methods"
_discovered = False


def register_method(name: str):
    """Class decorator: make a method available as `fewstep distill --method NAME`."""

    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def import_modules(package: str, folder: str | Path) -> list[str]:
    """Import every module of `package` (whose folder is `folder`; names starting with "_" are skipped), so that
    their `@register_method` decorators run; returns the module names."""
    names = sorted(m.name for m in pkgutil.iter_modules([str(folder)]) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


def discover_methods() -> None:
    """Once: import every module of the fewstep.methods package, then every `fewstep.methods` entry point. A
    plugin that fails to load is set aside with a warning (the other methods still work); asking for it by name
    is a one-line error saying why."""
    global _discovered
    if _discovered:
        return
    import_modules(__name__.rpartition(".")[0], Path(__file__).parent)  # fewstep.methods, this module's folder
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not take the other methods down
            _BROKEN[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"
            warnings.warn(f"fewstep: cannot load the method plugin {ep.name!r} ({_BROKEN[ep.name]})", stacklevel=2)
    _discovered = True


def available_methods() -> list[str]:
    discover_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[DistillMethod]:
    discover_methods()
    if name not in _REGISTRY:
        if name in _BROKEN:
            raise FewstepError(f"cannot load the method plugin {name!r} ({_BROKEN[name]})")
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
