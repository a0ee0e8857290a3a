"""Quality of TDM's recipe students on the built-in teachers (slow: minutes on 2 cores; the checkerboard's
batch-2048 recipe about 14 on one thread).

Issue bars: the 4-step student at most 1.2x the teacher's best metric (its 50-step Heun) and the 1-step at
most 0.3x the teacher's 1 step, both for the same (sampling-steps-aware) student, on digits and on
toy:checkerboard.

The checkerboard runs on one thread, as its recipe was measured: the seed-0 student scores 0.0255 at 4 steps
against the bar of 0.0305 (seeds 1 and 2: 0.0294 and 0.0238). Another thread count rounds differently and so
trains a different, unmeasured run of the same recipe.
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
@pytest.mark.usefixtures("one_thread")
def test_tdm_checkerboard_meets_both_bars(tmp_path):
    rows = _run(tmp_path, "toy:checkerboard", [1, 4])
    assert rows[("student", 4)] <= 1.2 * rows[("teacher (best)", 50)]
    assert rows[("student", 1)] <= 0.3 * rows[("teacher", 1)]
