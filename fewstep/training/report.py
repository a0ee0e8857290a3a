"""What a run shows: sample grids during training and the final quality table (teacher vs student)."""

from __future__ import annotations

import functools
from pathlib import Path

from fewstep.fileio import atomic_write
from fewstep.teachers import data_kind, load_model
from fewstep.training.config import teacher_options
from fewstep.training.run import METRICS, SAMPLES, STUDENT, STUDENT_ONLINE, append_log

DEFAULT_EVAL_NUM = {"2d": 4096, "image": 2000, "text2image": 16}


GRID_SEED = 1234  # sample grids use fixed per-sample seeds, separate from the training RNG
EVAL_SEED = 0
# reported beside the default metric in quality rows: the smallest mode's (class's) share of the samples
SECONDARY_METRICS = {"toy:gaussians8": "coverage", "digits": "class-coverage"}


def save_sample_grid(denoiser, path: Path, steps: int = 1, num: int | None = None, cond=None) -> Path:
    """A PNG of the model's samples: an image grid (64 images; 16 decoded images for text-to-image models, with
    `cond` the conditions of each, else the empty prompt) or a 2-D scatter plot (4096 points)."""
    from fewstep.outputs import image_grid, scatter_png
    from fewstep.sampling import generate, sampler_settings

    kind = data_kind(denoiser)
    two_d = kind == "2d"
    if cond is not None:
        num = next(iter(cond.values())).shape[0] if isinstance(cond, dict) else cond.shape[0]
    num = num or (4096 if two_d else 16 if kind == "text2image" else 64)
    if kind == "text2image" and cond is None:
        cond = denoiser.components.encode_prompts([""] * num)
    s = sampler_settings(denoiser, steps=steps, solver=denoiser.meta.get("default_solver", "fewstep"))
    x, _ = generate(denoiser, num, timesteps=s.timesteps, solver=s.solver, seed=GRID_SEED, batch_size=1024,
                    renoise=s.renoise, guidance=s.guidance, cond=cond)
    if kind == "text2image":
        x = denoiser.components.decode(x)
    im = scatter_png(x) if two_d else image_grid(x, nrow=8 if x.shape[0] >= 8 else x.shape[0],
                                                 scale=max(1, 128 // x.shape[-1]))
    return atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def evaluate_model(denoiser, data: str, *, steps: int, solver: str, num: int, seed: int = EVAL_SEED,
                   guidance: float = 1.0, renoise: str = "fresh", timesteps=None) -> dict:
    """The built-in metric of `num` samples (steps, solver) against the data's held-out reference.
    `timesteps` (a decreasing list) overrides uniform spacing."""
    from fewstep.eval import default_metric, evaluate
    from fewstep.sampling import generate

    x, labels = generate(denoiser, num, steps=None if timesteps is not None else steps, timesteps=timesteps,
                         solver=solver, seed=seed, batch_size=1024, guidance=guidance, renoise=renoise)
    metric = default_metric(data)
    res = evaluate(metric, x, None, data=data, labels=labels)
    out = {"metric": metric, "value": float(res["value"]), "n_samples": int(num)}
    extra = SECONDARY_METRICS.get(data)
    if extra is not None:  # e.g. mode coverage, where distribution matching is known to drop modes
        out[extra] = float(evaluate(extra, x, None, data=data, labels=labels)["value"])
    return out


@functools.lru_cache(maxsize=32)
def _teacher_metric_cached(teacher_spec: str, data: str, steps: int, solver: str, num: int, guidance: float):
    from fewstep.teachers import load_teacher

    return evaluate_model(load_teacher(teacher_spec), data, steps=steps, solver=solver, num=num, guidance=guidance)


def teacher_metric(teacher, teacher_spec: str | None, data: str, *, steps: int, solver: str, num: int,
                   guidance: float = 1.0) -> dict:
    """Like evaluate_model for a teacher; results for a named teacher are cached within the process."""
    if teacher_spec is not None:
        return dict(_teacher_metric_cached(str(teacher_spec), data, steps, solver, num, guidance))
    return evaluate_model(teacher, data, steps=steps, solver=solver, num=num, guidance=guidance)


def quality_table(teacher, student, data: str, *, num: int, student_steps=(1, 2, 4), teacher_spec: str | None = None,
                  guidance: float = 1.0, progress=None) -> list[dict]:
    """Rows: the teacher at its best setting (its default solver and step count), the teacher at 1
    Euler step, and the student at each of `student_steps` with its own sampler."""
    tm = teacher.meta
    best_steps, best_solver = int(tm.get("default_steps", 50)), str(tm.get("default_solver", "heun"))
    rows = []
    for label, steps, solver in (("teacher (best)", best_steps, best_solver), ("teacher", 1, "euler")):
        r = teacher_metric(teacher, teacher_spec, data, steps=steps, solver=solver, num=num, guidance=guidance)
        rows.append({"model": label, "solver": solver, "steps": steps, **r})
        if progress:
            progress()
    from fewstep.sampling import sampler_settings

    for steps in student_steps:
        s = sampler_settings(student, steps=int(steps), solver=student.meta.get("default_solver", "fewstep"))
        r = evaluate_model(student, data, steps=s.steps, solver=s.solver, num=num, guidance=s.guidance,
                           renoise=s.renoise, timesteps=s.timesteps)
        rows.append({"model": "student", "solver": s.solver, "steps": s.steps, **r})
        if progress:
            progress()
    return rows


def extra_columns(rows: list[dict]) -> list[str]:
    """The secondary metrics present in quality rows (see SECONDARY_METRICS)."""
    names = sorted(set(SECONDARY_METRICS.values()))
    return [n for n in names if any(n in r for r in rows)]


def table_text(rows: list[dict]) -> str:
    """A plain-text table of quality rows (for logs and the README)."""
    extras = extra_columns(rows)
    lines = [f"{'model':<16} {'solver':<8} {'steps':>5}  {'metric':<10} {'value':>9}"
             + "".join(f" {e:>14}" for e in extras)]
    for r in rows:
        lines.append(f"{r['model']:<16} {r['solver']:<8} {r['steps']:>5}  {r['metric']:<10} {r['value']:>9.4f}"
                     + "".join(f" {r[e]:>14.4f}" if e in r else f" {'':>14}" for e in extras))
    return "\n".join(lines)


def finish_run(trainer, progress_eval=None) -> dict:
    """The end of a finished run (main process; the others return the summary only): save the student (and the
    raw online weights when it is an EMA), a sample grid per evaluated step count, the quality table (teacher
    vs student on the data's built-in metric; the teacher in full precision), metrics.json and the log's
    "quality" line."""
    import json
    import time

    from fewstep.models.io import save_denoiser

    cfg, out = trainer.cfg, trainer.out
    result: dict = {"run": str(out), "method": cfg.method, "teacher": cfg.teacher,
                    "iterations": trainer.iteration, "train_seconds": round(trainer.elapsed, 2)}
    if not trainer.accelerator.is_main_process:
        return result
    model = trainer.sampling_model()
    save_denoiser(model, out / STUDENT)
    if trainer.ema is not None:
        online = trainer.student
        online.meta.update(trainer.student_meta())
        save_denoiser(online, out / STUDENT_ONLINE)
    eval_steps = tuple(cfg.eval_steps or trainer.method.eval_steps())
    for steps in eval_steps:
        save_sample_grid(model, out / SAMPLES / f"final_{steps}step.png", steps=steps, cond=trainer.grid_cond())
    result["student"] = str(out / STUDENT)
    rows = []
    data = trainer.data_name or trainer.teacher.meta.get("data")
    kind = data_kind(trainer.teacher)
    if cfg.eval and data is not None and kind != "text2image":  # no built-in text metric
        num = cfg.eval_num or DEFAULT_EVAL_NUM[kind]
        spec = cfg.teacher if not Path(cfg.teacher).exists() else None
        t0 = time.perf_counter()
        teacher = trainer.teacher
        if trainer.teacher_cast:  # the table scores the teacher in full precision, not its bf16 training copy
            teacher = (trainer.teacher_fp32 if trainer.teacher_given
                       else load_model(cfg.teacher, **teacher_options(cfg)))
            teacher.to(trainer.device).eval()
        rows = quality_table(teacher, model, data, num=num, student_steps=eval_steps, teacher_spec=spec,
                             guidance=cfg.guidance, progress=progress_eval)
        result["eval_seconds"] = round(time.perf_counter() - t0, 2)
    result["table"] = rows
    for key, value in trainer.method.metrics().items():  # the method's own numbers (e.g. reflow's straightness)
        result.setdefault(key, value)
    metrics = dict(result)
    atomic_write(out / METRICS, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1)))
    if rows:
        append_log(out, {"iteration": trainer.iteration, "event": "quality", "table": rows})
        result["table_text"] = table_text(rows)
    return result
