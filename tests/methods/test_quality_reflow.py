"""Quality bars for reflow on the built-in teachers (slow: minutes on 2 cores).

One reflow round (the recipe) must make the 2-step Euler student at least 2x better than the teacher at 2 steps
with its best 2-step solver (Heun; Euler and DPM-Solver++(2M) are worse there) and the straightness at least 3x
lower than the teacher's; one-step distillation on the same pairs must bring the 1-step student within 2x of the
teacher's best (its default 50-step Heun). Same metric and number of samples for every entry.
"""

import dataclasses

import pytest

from fewstep.methods.reflow import Reflow, ReflowConfig
from fewstep.sampling.pairs import generate_pairs
from fewstep.teachers import data_kind, load_teacher
from fewstep.training import distill
from fewstep.training.report import DEFAULT_EVAL_NUM, evaluate_model

TEACHERS = ["toy:checkerboard", "digits"]


def _table(res):
    return {(r["model"], r["steps"]): r["value"] for r in res["table"]}


@pytest.fixture(scope="module")
def recipe_pairs(tmp_path_factory):
    """Each teacher's pairs with the recipe's settings, made once for both bars (as `fewstep pairs` would)."""
    made = {}

    def get(teacher):
        if teacher not in made:
            den = load_teacher(teacher)
            opts = {**dataclasses.asdict(ReflowConfig()), **Reflow.recipes[data_kind(den)]["options"]}
            out = tmp_path_factory.mktemp("pairs") / teacher.replace(":", "_")
            generate_pairs(den, out, opts["pair_num"], steps=opts["pair_steps"], solver=opts["pair_solver"],
                           spacing=opts["pair_spacing"], seed=opts["pair_seed"], shard_size=opts["pair_shard_size"],
                           batch_size=opts["pair_batch_size"], teacher_spec=teacher)
            made[teacher] = str(out)
        return made[teacher]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("teacher", TEACHERS)
def test_one_reflow_round_beats_the_teacher_at_two_steps(tmp_path, teacher, recipe_pairs):
    res = distill(method="reflow", teacher=teacher, out=str(tmp_path / "run"), sample_every=0, checkpoint_every=0,
                  options={"pairs": recipe_pairs(teacher)})
    t = _table(res)
    den = load_teacher(teacher)
    num = DEFAULT_EVAL_NUM[data_kind(den)]
    two = {s: evaluate_model(den, den.meta["data"], steps=2, solver=s, num=num)["value"]
           for s in ("euler", "heun", "dpm++2m")}
    straight = {r["after"]: r["value"] for r in res["straightness"]}
    print(teacher, t, two, straight)
    assert min(two, key=two.get) == "heun"
    assert t[("student", 2)] <= 0.5 * two["heun"]
    assert straight["round 1"] * 3 <= straight["teacher"]


@pytest.mark.slow
@pytest.mark.parametrize("teacher", TEACHERS)
def test_one_step_distillation_is_within_2x_of_the_teachers_best(tmp_path, teacher, recipe_pairs):
    res = distill(method="reflow", teacher=teacher, out=str(tmp_path / "run"), sample_every=0, checkpoint_every=0,
                  eval_steps=[1], options={"pairs": recipe_pairs(teacher), "distill_1step": True})
    t = _table(res)
    print(teacher, t)
    assert t[("student", 1)] <= 2.0 * t[("teacher (best)", 50)]
