"""Fixtures shared across the test packages (and tests/ on sys.path for `support`, the shared helpers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import support` from any test package


def run_weights(run: Path, sub: str = "student") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run) / sub / "model.safetensors"))


def check_resume_matches(tmp_path: Path, iters: int = 8, **kw) -> None:
    """A run stopped after 3 iterations and resumed three times ends with exactly the weights (student, online
    student) and log lines of an uninterrupted one, and those weights moved away from the teacher's."""
    from fewstep.teachers import load_teacher
    from fewstep.training import distill

    full, split = tmp_path / "full", tmp_path / "split"
    distill(out=str(full), iters=iters, checkpoint_every=0, **kw)
    res = distill(out=str(split), iters=iters, checkpoint_every=0, stop_after=3, **kw)
    assert not res["finished"] and res["iterations"] == 3 and not (split / "student").exists()
    distill(out=str(split), resume=True, stop_after=1)  # 3 -> 4
    distill(out=str(split), resume=True, stop_after=1)  # 4 -> 5
    assert yaml.safe_load((split / "config.yaml").read_text())["stop_after"] is None
    distill(out=str(split), resume=True)  # 5 -> iters: stop_after is not remembered
    for sub in ("student", "student_online"):
        a, b = run_weights(full, sub), run_weights(split, sub)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)
    teacher = load_teacher(kw["teacher"]).net.state_dict()
    online = run_weights(full, "student_online")
    assert any(not torch.equal(online[k], teacher[k]) for k in teacher)
    # the loss lines (event lines, such as sCM's JVP backend, are logged again by a resumed process)
    log = [r for r in map(json.loads, (split / "log.jsonl").read_text().splitlines()) if "losses" in r]
    assert [r["iteration"] for r in log] == list(range(1, iters + 1))
    full_log = [r for r in map(json.loads, (full / "log.jsonl").read_text().splitlines()) if "losses" in r]
    assert [r["losses"] for r in log] == [r["losses"] for r in full_log]


@pytest.fixture
def resume_matches():
    """`resume_matches(tmp_path, **distill_kwargs)`: see `check_resume_matches`."""
    return check_resume_matches


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny-network tests: on a shared 2-core machine intra-op threads
    only add synchronisation (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
