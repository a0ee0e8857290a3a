"""Quality bars for sCD and rCM on the built-in teachers (slow: minutes on 2 cores).

With the method's recipe, the sCD student's 2-step metric must be at most 1.5x the teacher's best (its
default 50-step Heun) and its 1-step metric at most 0.3x the teacher's own 1-step Euler metric, on the
built-in metric with the same number of samples; rCM's 1-step metric must be at least as good as sCD's.
"""

import pytest

from fewstep.training import distill


def _table(res):
    return {(r["model"], r["steps"]): r["value"] for r in res["table"]}


@pytest.fixture(scope="module")
def scd_tables(tmp_path_factory):
    """The sCD run of each teacher, made once for both tests."""
    cache = {}

    def get(teacher):
        if teacher not in cache:
            out = tmp_path_factory.mktemp("scd") / "run"
            res = distill(method="scm", teacher=teacher, out=str(out), sample_every=0, checkpoint_every=0)
            cache[teacher] = (_table(res), res["train_seconds"])
        return cache[teacher]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["toy:checkerboard", "digits"])
def test_scd_quality_bar(scd_tables, teacher):
    t, seconds = scd_tables(teacher)
    best = t[("teacher (best)", 50)]
    print(teacher, t, seconds)
    assert t[("student", 1)] <= 0.3 * t[("teacher", 1)]
    assert t[("student", 2)] <= 1.5 * best


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["toy:checkerboard", "digits"])
def test_rcm_one_step_is_at_least_as_good_as_scd(tmp_path, scd_tables, teacher):
    res = distill(method="rcm", teacher=teacher, out=str(tmp_path / "run"), sample_every=0, checkpoint_every=0)
    t = _table(res)
    scd = scd_tables(teacher)[0]
    print(teacher, "rcm", t, "scd", scd, res["train_seconds"])
    assert t[("student", 1)] <= scd[("student", 1)]
