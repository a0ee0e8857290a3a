"""Helpers shared by test modules (importable because tests/conftest.py puts tests/ on sys.path first)."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_run(*args):
    """`fewstep ARGS...` in-process through typer's runner (exceptions propagate)."""
    from typer.testing import CliRunner

    from fewstep.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def last_json(result) -> dict:
    """The JSON object a `--json` command printed as its last non-empty stdout line."""
    return json.loads([ln for ln in result.stdout.strip().splitlines() if ln.strip()][-1])


def ok_json(result) -> dict:
    """`last_json` of a command that must have succeeded."""
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return last_json(result)


def assert_one_line_error(result, *needles) -> None:
    """Exit code 2, and one `error: ...` line on stderr (no traceback) that contains every needle."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def free_port() -> int:
    """A free TCP port for a process group (two launches on accelerate's default port 29500 collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_benchmark(name: str):
    """benchmarks/NAME.py imported as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
