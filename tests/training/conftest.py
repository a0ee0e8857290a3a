import pytest

from fewstep.methods import base


@pytest.fixture
def register(monkeypatch):
    """Register a method class for one test only."""

    def _register(name, cls):
        cls.name = name
        monkeypatch.setitem(base._REGISTRY, name, cls)
        base._load_builtin_methods()
        return cls

    return _register
