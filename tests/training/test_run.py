"""The run: config merging (a recipe file, then keyword overrides), the plan's teacher and method reused by the
trainer, and the summary a model card reads."""

from __future__ import annotations

import json

import torch

from fewstep.training import distill
from fewstep.training.run import merge_values, plan_run, run_summary
from fewstep.training.trainer import Trainer


def test_options_replace_and_update_options_merge_into_the_recipe_files(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: dmd2\niters: 7\noptions:\n  steps: 4\n  gan: true\n")
    values, explicit = merge_values(recipe, {"iters": 9}, {"gan": False, "t_min": 0.1})  # like --opt
    assert values == {"method": "dmd2", "iters": 9, "options": {"steps": 4, "gan": False, "t_min": 0.1}}
    assert explicit == {"method", "iters", "options"}
    values, explicit = merge_values(recipe, {"options": {"gan": False}})  # a keyword replaces them
    assert values["options"] == {"gan": False} and "options" in explicit
    values, explicit = merge_values(None, {}, {"steps": 2})
    assert values == {"options": {"steps": 2}} and explicit == {"options"}


def test_the_trainer_reuses_the_method_and_teacher_the_checks_built(tmp_path):
    values = dict(method="tdm", teacher="toy:checkerboard", iters=2, batch_size=8, out=str(tmp_path / "r"),
                  eval=False, sample_every=0)
    plan = plan_run(values, explicit=set(values))
    assert plan.config.iters == 2 and plan.config.options["step_weights"] == "full:9"  # the recipe's options
    tr = Trainer(plan.config, teacher=plan.teacher, method=plan.method)
    assert tr.method is plan.method and tr.teacher is plan.teacher
    other = Trainer(plan.config, method=plan.method)  # a teacher of its own: a method built for it
    assert other.method is not plan.method and other.method.teacher is other.teacher
    assert not (tmp_path / "r").exists()  # planning and building write nothing


def test_run_summary_reads_the_config_log_and_metrics(tmp_path):
    torch.manual_seed(0)
    res = distill(method="cd", teacher="toy:moons", iters=4, batch_size=16, out=str(tmp_path / "run"), eval=False,
                  sample_every=0, log_every=2, guidance=1.0)
    summary = run_summary(res["run"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["iters"] == 4 and summary["batch_size"] == 16 and summary["guidance"] == 1.0
    assert summary["train_seconds"] == metrics["train_seconds"]
    assert set(summary["losses"]) >= {"student/loss", "student/mse"}
    assert run_summary(tmp_path / "nothing-here") == {}
