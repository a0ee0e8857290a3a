"""`distill()`: a distillation run from its config to its report (what `fewstep distill` and
`fewstep.distill` run): plan the run, start the processes, train, and write the student and quality table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fewstep.training.accelerator import process_state
from fewstep.training.config import DistillConfig
from fewstep.training.report import finish_run
from fewstep.training.run import merge_values, plan_run, run_device, write_config
from fewstep.training.trainer import Trainer


def distill(config: str | Path | dict | DistillConfig | None = None, *, resume: bool = False, progress=None,
            progress_eval=None, teacher_model=None, status=None, update_options: dict | None = None,
            **overrides) -> dict:
    """Distill a teacher into a few-step student; returns a JSON-able summary (with the quality table).

    `config`: a YAML recipe path, a dict or a DistillConfig; keyword `overrides` win over it (each is a
    DistillConfig field: method, teacher, iters, batch_size, lr, out, ...; `options` replaces the config's method
    options), and `update_options` set method options on top of them key by key (like `--opt`). With
    `resume=True`, `out` names an existing run, which continues from its latest checkpoint. `teacher_model` may
    pass an already loaded Denoiser (then the `teacher` field only names it).
    `progress(iteration, total, losses)` is called every iteration; `status(text)` gets short notes from the
    method's own preparation (e.g. reflow's pairs); `progress_eval()` after each row of the quality table.
    """
    values, explicit = merge_values(config, overrides, update_options)
    state = process_state(run_device(values, resume))
    plan = plan_run(values, explicit=explicit, resume=resume, check_out=state.is_main_process)
    cfg = plan.config
    if state.num_processes > 1:  # every rank writes to rank 0's run directory (its default name has a time)
        from accelerate.utils import broadcast_object_list

        cfg = dataclasses.replace(cfg, out=broadcast_object_list([cfg.out])[0])
    given = teacher_model is not None
    trainer = Trainer(cfg, resume=resume, progress=progress, teacher=teacher_model if given else plan.teacher,
                      method=None if given else plan.method, status=status, reloadable_teacher=not given)
    if not resume and state.is_main_process:  # only once the run is known to start: a failure writes nothing
        write_config(cfg)
    state.wait_for_everyone()
    summary = trainer.train()
    result = {"run": str(cfg.out), "method": cfg.method, "teacher": cfg.teacher, **summary}
    if summary["finished"]:
        result.update(finish_run(trainer, progress_eval))
    else:
        result["checkpoint"] = str(Path(cfg.out) / "checkpoints")
        result["resume_with"] = f"fewstep distill --resume --out {cfg.out}"
    return result
