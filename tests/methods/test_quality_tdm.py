"""Quality of TDM's recipe students on the built-in teachers (slow: minutes on 2 cores; the checkerboard's
batch-2048 recipe about 12).

Issue bars: the 4-step student at most 1.2x the teacher's best metric (its 50-step Heun) and the 1-step at
most 0.3x the teacher's 1 step, both for the same (sampling-steps-aware) student, on digits and on
toy:checkerboard.
"""

import pytest

from fewstep.training import distill


def _run(tmp_path, teacher, steps):
    res = distill(method="tdm", teacher=teacher, out=str(tmp_path / "run"), sample_every=0, checkpoint_every=0,
                  eval_steps=steps)
    rows = {(r["model"], r["steps"]): r["value"] for r in res["table"]}
    print(teacher, {k: round(v, 4) for k, v in rows.items()})
    return rows


@pytest.mark.slow
def test_tdm_digits_meets_both_bars(tmp_path):
    rows = _run(tmp_path, "digits", [1, 4])
    assert rows[("student", 4)] <= 1.2 * rows[("teacher (best)", 50)]
    assert rows[("student", 1)] <= 0.3 * rows[("teacher", 1)]


@pytest.mark.slow
def test_tdm_checkerboard_meets_both_bars(tmp_path):
    rows = _run(tmp_path, "toy:checkerboard", [1, 4])
    assert rows[("student", 4)] <= 1.2 * rows[("teacher (best)", 50)]
    assert rows[("student", 1)] <= 0.3 * rows[("teacher", 1)]
