import pytest

from fewstep.methods import registry


@pytest.fixture
def register(monkeypatch):
    """Register a method class for one test only."""

    def _register(name, cls):
        cls.name = name
        monkeypatch.setitem(registry._REGISTRY, name, cls)
        registry.discover_methods()
        return cls

    return _register
