"""Quality bars for sCD on the built-in teachers (slow: minutes on 2 cores).

With the method's recipe, the sCD student's 2-step metric must be at most 1.5x the teacher's best (its
default 50-step Heun) and its 1-step metric at most 0.3x the teacher's own 1-step Euler metric, on the
built-in metric with the same number of samples.
"""

import pytest

from fewstep.training import distill


def _table(res):
    return {(r["model"], r["steps"]): r["value"] for r in res["table"]}


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["toy:checkerboard", "digits"])
def test_scd_quality_bar(tmp_path, teacher):
    res = distill(method="scm", teacher=teacher, out=str(tmp_path / "run"), sample_every=0, checkpoint_every=0)
    t = _table(res)
    best = t[("teacher (best)", 50)]
    print(teacher, t, res["train_seconds"])
    assert t[("student", 1)] <= 0.3 * t[("teacher", 1)]
    assert t[("student", 2)] <= 1.5 * best
