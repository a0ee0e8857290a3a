"""The distillation trainer (accelerate) and `distill()`, the function behind `fewstep distill`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fewstep.training.config import RECIPES, DistillConfig, load_yaml


def distill(config: str | Path | dict | DistillConfig | None = None, *, resume: bool = False, progress=None,
            progress_eval=None, teacher_model=None, status=None, **overrides) -> dict:
    """Distill a teacher into a few-step student; returns a JSON-able summary (with the quality table).

    `config`: a YAML recipe path, a dict or a DistillConfig; keyword `overrides` win over it (each is a
    DistillConfig field: method, teacher, iters, batch_size, lr, out, ...). With `resume=True`, `out`
    names an existing run, which continues from its latest checkpoint. `teacher` may pass an already
    loaded Denoiser (then the `teacher` field only names it). `progress(iteration, total, losses)` is called
    every iteration; `status(text)` gets short notes from the method's own preparation (e.g. reflow's pairs).
    """
    from accelerate.state import PartialState

    from fewstep.training.trainer import Trainer, prepare_run, write_config

    values: dict = {}
    explicit: set[str] = set()
    if isinstance(config, (str, Path)):
        values.update(load_yaml(config))
    elif isinstance(config, DistillConfig):
        values.update(dataclasses.asdict(config))
    elif isinstance(config, dict):
        values.update(config)
    explicit |= set(values)
    values.update(overrides)
    explicit |= set(overrides)
    import torch

    device = values.get("device")
    if device is None and resume and values.get("out"):  # a resumed run keeps the device it was started on
        saved = Path(values["out"]) / "config.yaml"
        device = load_yaml(saved).get("device") if saved.is_file() else None
    device = device or "auto"
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    existing = PartialState() if PartialState._shared_state else None
    if existing is not None and existing.num_processes == 1 and (existing.device.type == "cpu") != cpu:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    # on CPU, several processes (accelerate launch / torchrun) only form a group with cpu=True
    state = PartialState(cpu=cpu)
    loaded: dict = {}
    cfg = prepare_run(values, explicit=explicit, resume=resume, check_out=state.is_main_process, loaded=loaded)
    if state.num_processes > 1:  # every rank writes to rank 0's run directory (its default name has a time)
        from accelerate.utils import broadcast_object_list

        cfg = dataclasses.replace(cfg, out=broadcast_object_list([cfg.out])[0])
    trainer = Trainer(cfg, resume=resume, progress=progress, teacher=teacher_model or loaded.pop("teacher", None),
                      status=status, reloadable_teacher=teacher_model is None)
    if not resume and state.is_main_process:  # only once the run is known to start: a failure writes nothing
        write_config(cfg)
    state.wait_for_everyone()
    summary = trainer.train()
    result = {"run": str(cfg.out), "method": cfg.method, "teacher": cfg.teacher, **summary}
    if summary["finished"]:
        result.update(trainer.finish(progress_eval))
    else:
        result["checkpoint"] = str(Path(cfg.out) / "checkpoints")
        result["resume_with"] = f"fewstep distill --resume --out {cfg.out}"
    return result


__all__ = ["RECIPES", "DistillConfig", "distill"]
