"""The method registry finds every method without a hand-kept list, plugins through entry points, and each
method's recipes and flags name real config fields and options."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest

from fewstep.errors import FewstepError
from fewstep.methods import available_methods, build_method_config, get_method, registry
from fewstep.training.config import DistillConfig, make_config

METHODS_DIR = Path(registry.__file__).parent


def test_every_method_defined_in_the_package_is_found():
    declared = set()
    for path in METHODS_DIR.glob("*.py"):
        declared |= set(re.findall(r'^@register_method\("([^"]+)"\)', path.read_text(), re.M))
    assert declared == set(available_methods())
    assert {"cd", "lcm", "scm", "rcm", "dmd", "dmd2", "sid", "tdm", "reflow"} <= declared


def test_a_method_from_an_entry_point_is_registered(tmp_path, monkeypatch):
    (tmp_path / "fewstep_plugin_method.py").write_text(
        "from fewstep.methods import register_method\n"
        "from fewstep.methods.consistency import ConsistencyDistillation\n\n"
        "@register_method('plugin-cd')\n"
        "class PluginCD(ConsistencyDistillation):\n"
        "    description = 'a plugin'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_BROKEN", {})
    monkeypatch.setattr(registry, "_discovered", False)
    from importlib.metadata import EntryPoint

    points = [EntryPoint("plugin-cd", "fewstep_plugin_method", "fewstep.methods")]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: points if group == "fewstep.methods"
                        else [])
    try:
        assert get_method("plugin-cd").description == "a plugin"
        assert "plugin-cd" in available_methods()
    finally:
        sys.modules.pop("fewstep_plugin_method", None)


def test_a_broken_plugin_is_set_aside_and_named_in_a_one_line_error(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_BROKEN", {})
    monkeypatch.setattr(registry, "_discovered", False)
    from importlib.metadata import EntryPoint

    points = [EntryPoint("broken", "fewstep_no_such_module_here", "fewstep.methods")]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: points)
    with pytest.warns(UserWarning, match="cannot load the method plugin 'broken'"):
        names = available_methods()
    assert "cd" in names and "broken" not in names  # the other methods still work
    with pytest.raises(FewstepError, match="cannot load the method plugin 'broken' .*ModuleNotFoundError"):
        get_method("broken")


def test_discovery_imports_every_module_of_a_package(tmp_path, monkeypatch):
    """The mechanism behind "a new method is one file": every module of the folder is imported and registers
    itself (modules starting with _ are skipped); no list names them."""
    pkg = tmp_path / "fewstep_fake_methods"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("alpha", "beta", "_private"):
        (pkg / f"{name}.py").write_text(
            "from fewstep.methods import register_method\n"
            "from fewstep.methods.consistency import ConsistencyDistillation\n\n"
            f"@register_method('fake-{name}')\n"
            "class M(ConsistencyDistillation):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    try:
        assert registry.import_modules("fewstep_fake_methods", pkg) == ["alpha", "beta"]
        assert {"fake-alpha", "fake-beta"} <= set(registry._REGISTRY) and "fake-_private" not in registry._REGISTRY
    finally:
        for name in [m for m in sys.modules if m.startswith("fewstep_fake_methods")]:
            sys.modules.pop(name)


@pytest.mark.parametrize("name", available_methods())
def test_recipes_are_valid_configs_and_options(name):
    cls = get_method(name)
    assert "recipes" in vars(cls), f"{name} must carry its own recipes (not inherit its parent's)"
    assert set(cls.recipes) <= {"2d", "image", "text2image"} and {"2d", "image"} <= set(cls.recipes)
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    for kind, recipe in cls.recipes.items():
        assert set(recipe) <= fields, (kind, set(recipe) - fields)
        make_config({"method": name, **recipe})  # every value passes the config's checks
        build_method_config(name, recipe.get("options"))  # every option is one of the method's
    for option in cls.cli_options:
        assert option in {f.name for f in dataclasses.fields(cls.config_class)}
