"""The `fewstep` command line: a thin Typer layer over ``fewstep.api``.

Conventions for every command: ``--json`` prints one JSON object (the result) as the last line
of stdout, with progress on stderr; exit code 0 on success, 2 on bad input with a one-line error
naming the bad value and what is allowed (``--debug`` shows the traceback), and nothing is
written when a command fails.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fewstep.commands.eval_features import register as register_feature_evals
from fewstep.commands.pairs import register as register_pairs
from fewstep.errors import FewstepError

app = typer.Typer(
    name="fewstep",
    help="Distill many-step diffusion and flow teachers into 1-4 step students.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
teacher_app = typer.Typer(help="Built-in and home-made teachers: list them, train one.", no_args_is_help=True,
                          rich_markup_mode=None)
eval_app = typer.Typer(help="Score samples against a reference (one subcommand per metric).",
                       no_args_is_help=True, rich_markup_mode=None)
app.add_typer(teacher_app, name="teacher")
app.add_typer(eval_app, name="eval")

out_console = Console()
err_console = Console(stderr=True)
_state = {"debug": bool(os.environ.get("FEWSTEP_DEBUG"))}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    if debug:
        _state["debug"] = True


def command(fn):
    """Turn library errors into one line on stderr and exit code 2 (1 for unexpected errors)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except FewstepError as e:
            if _state["debug"]:
                raise
            err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", markup=False)
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the user gets one line; --debug shows the rest
            if _state["debug"]:
                raise
            err_console.print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)",
                              markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


class _Bar:
    """A progress bar on stderr that appears on first use (so input errors print alone).

    Call it (or .advance(n)) to advance; .set_total(n) and .note(text) (e.g. current losses).
    Columns: description, bar, count, rate, elapsed, ETA, note.
    """

    def __init__(self, description: str, total: int | None, enabled: bool = True):
        self.description, self.total, self.enabled = description, total, enabled
        self._prog = self._task = None

    def _ensure(self):
        if self._prog is None and self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class RateColumn(ProgressColumn):
                def render(self, task):
                    return Text(f"{task.speed:,.1f}/s" if task.speed else "-/s")

            self._prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                  TextColumn("{task.fields[note]}"), console=err_console)
            self._prog.start()
            self._task = self._prog.add_task(self.description, total=self.total, note="")
        return self._prog

    def __call__(self, n: int = 1):
        self.advance(n)

    def advance(self, n: int = 1):
        if self._ensure() is not None:
            self._prog.advance(self._task, n)

    def set_total(self, total: int):
        if self._ensure() is not None:
            self._prog.update(self._task, total=total)

    def note(self, text: str):
        if self._ensure() is not None:
            self._prog.update(self._task, note=text)

    def close(self):
        if self._prog is not None:
            self._prog.stop()


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True):
    """A `_Bar` that is stopped (and its last state printed) when the block ends."""
    bar = _Bar(description, total, enabled)
    try:
        yield bar
    finally:
        bar.close()


def emit(result: dict, as_json: bool, title: str) -> None:
    """Print the result: a table for people, or one JSON object as the last stdout line."""
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    if as_json:
        sys.stdout.write(json.dumps(public, default=str) + "\n")
        sys.stdout.flush()
        return
    table = Table(title=title, show_header=False)
    for k, v in public.items():
        table.add_row(str(k), json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
    out_console.print(table)


JSON_OPT = typer.Option(False, "--json", help="Print the result as one JSON object (last line of stdout).")


# -- sample ----------------------------------------------------------------------------------------
@app.command()
@command
def sample(
    teacher: str | None = typer.Option(None, "--teacher", help="Built-in teacher name or model directory."),
    model: str | None = typer.Option(None, "--model", help="A model or run directory (same as --teacher)."),
    steps: int | None = typer.Option(None, help="Sampling steps (default: the model's own)."),
    solver: str | None = typer.Option(None, help="euler | heun | dpm++2m | fewstep (default: the model's)."),
    spacing: str | None = typer.Option(None, help="Time spacing: uniform | karras | trailing | shifted (default: the "
                                       "model's own time list, else uniform)."),
    renoise: str | None = typer.Option(None, help="Few-step re-noise: fresh | deterministic (default: the model's)."),
    num: int = typer.Option(4096, help="Number of samples."),
    seed: int = typer.Option(0, help="Base seed; sample i uses its own seed derived from it."),
    guidance: float | None = typer.Option(None, help="Classifier-free guidance scale (1 = none; default: the "
                                          "model's own, 1 for teachers)."),
    label: int | None = typer.Option(None, help="Class label for every sample (default: cycle classes)."),
    batch_size: int | None = typer.Option(None, help="Samples per network batch (default 1024; 8 for text-to-image "
                                          "models)."),
    out: Path | None = typer.Option(None, help="2-D: a new .npz file; images: a new directory (PNGs + grid.png)."),
    prompt: str | None = typer.Option(None, "--prompt", help="Text-to-image models: the prompt of every sample."),
    prompts: Path | None = typer.Option(None, "--prompts", help="Text-to-image models: a prompt file (.txt one per "
                                        "line, .jsonl, .csv); sample i gets prompt i modulo their number."),
    as_json: bool = JSON_OPT,
):
    """Draw samples from a teacher or student with the shared sampler engine."""
    from fewstep import api

    if (teacher is None) == (model is None):
        raise FewstepError("give exactly one of --teacher NAME|PATH or --model DIR")
    spec = teacher or model
    with progress_bar("sampling", num) as bar:
        result = api.sample(spec, num=num, steps=steps, solver=solver, spacing=spacing, seed=seed,
                            guidance=guidance, label=label, batch_size=batch_size, out=out, progress=bar.advance,
                            renoise=renoise, prompt=prompt, prompts=prompts)
    emit(result, as_json, "fewstep sample")


# -- eval ------------------------------------------------------------------------------------------
def _make_eval_command(metric: str):
    def run(
        samples: Path = typer.Option(..., "--samples", help="Samples: an .npz or an image directory."),
        ref: str | None = typer.Option(None, "--ref", help="Built-in data name or samples path "
                                          "(default: the data the samples' model was trained on)."),
        as_json: bool = JSON_OPT,
    ):
        from fewstep import api

        result = api.evaluate_samples(metric, samples, ref=ref)
        emit(result, as_json, f"fewstep eval {metric}")

    run.__doc__ = f"Score samples with the {metric} metric."
    return command(run)


def _register_eval_commands():
    from fewstep.eval import METRICS

    for m in METRICS:
        eval_app.command(m)(_make_eval_command(m))


_register_eval_commands()
register_feature_evals(eval_app)  # fid, stats, clip: fewstep/commands/eval_features.py


# -- teacher ---------------------------------------------------------------------------------------
@teacher_app.command("list")
@command
def teacher_list(as_json: bool = JSON_OPT):
    """List the built-in teachers shipped with the package."""
    from fewstep.teachers import BUILTIN_TEACHERS, load_teacher

    rows = []
    for name in BUILTIN_TEACHERS:
        den = load_teacher(name)
        rows.append({"name": name, "data": den.meta.get("data"), "shape": list(den.data_shape or []),
                     "conditioning": den.cond_kind, "params": sum(p.numel() for p in den.parameters())})
    if as_json:
        emit({"teachers": rows}, True, "")
        return
    table = Table(title="built-in teachers")
    for col in ("name", "data", "shape", "conditioning", "params"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r[c]) for c in ("name", "data", "shape", "conditioning", "params")))
    out_console.print(table)


@teacher_app.command("train")
@command
def teacher_train(
    data: str = typer.Option(..., "--data", help="toy:checkerboard | toy:gaussians8 | toy:moons | toy:spirals | "
                             "digits | digits16 | an image folder."),
    out: Path = typer.Option(..., "--out", help="New directory for model.safetensors + config.json."),
    iters: int | None = typer.Option(None, help="Training iterations (default: per data)."),
    batch_size: int | None = typer.Option(None, help="Batch size (default: per data)."),
    lr: float | None = typer.Option(None, help="Learning rate (default: per data)."),
    resolution: int | None = typer.Option(None, help="Image resolution for image folders."),
    seed: int = typer.Option(0, help="Seed."),
    as_json: bool = JSON_OPT,
):
    """Train a flow-matching teacher and write safetensors + config."""
    from fewstep import api

    _check_new_dir(out)
    with progress_bar("training teacher", iters) as bar:

        def progress(step: int, total: int, loss: float):
            bar.set_total(total)
            bar.advance(1)
            bar.note(f"loss {loss:.4f}")

        result = api.train_teacher(data, out, iters=iters, batch_size=batch_size, lr=lr, seed=seed,
                                   resolution=resolution, progress=progress)
    emit(result, as_json, "fewstep teacher train")


def _check_new_dir(out: Path):
    from fewstep.outputs import ensure_new_path

    ensure_new_path(out, "--out")


register_pairs(app)  # fewstep pairs: fewstep/commands/pairs.py


# -- distill / methods / export ---------------------------------------------------------------------
def _opt(default=None, help: str = "", flag: str | None = None):
    return typer.Option(default, *([flag] if flag else []), help=help, show_default=False)


@app.command()
@command
def distill(
    method: str | None = _opt(help="Distillation method (see `fewstep methods`; default cd)."),
    teacher: str | None = _opt(help="Teacher: built-in name, model directory or run directory "
                                    "(default toy:checkerboard)."),
    out: Path | None = _opt(help="New run directory (default runs/METHOD-TEACHER-TIME); with --resume, the run."),
    config: Path | None = _opt(help="YAML recipe of config fields; flags override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    data: str | None = _opt(help="Real data for methods that need it (default: the teacher's training data)."),
    iters: int | None = _opt(help="Training iterations (default: the method's recipe)."),
    batch_size: int | None = _opt(help="Batch size per process (default: the recipe)."),
    lr: float | None = _opt(help="Learning rate (default: the recipe)."),
    lr_schedule: str | None = _opt(help="constant | cosine, after the warm-up (default: the recipe, else constant)."),
    warmup: int | None = _opt(help="Linear LR warm-up iterations (default 100)."),
    grad_clip: float | None = _opt(help="Max gradient norm per network, 0 = off (default 1)."),
    grad_accum: int | None = _opt(help="Micro-batches per optimizer step (default 1)."),
    mixed_precision: str | None = _opt(help="no | bf16 | fp16 (default no)."),
    ema: str | None = _opt(help="Student EMA for sampling: none | fixed | power (default fixed)."),
    ema_decay: float | None = _opt(help="Fixed EMA decay (default: the recipe)."),
    ema_gamma: float | None = _opt(help="Power EMA exponent (default 6.94)."),
    guidance: float | None = _opt(help="Teacher CFG scale for conditional teachers (default 1)."),
    seed: int | None = _opt(help="Seed (default 0)."),
    device: str | None = _opt(help="auto | cpu | cuda (default auto)."),
    log_every: int | None = _opt(help="Write a log.jsonl line every N iterations (default 50)."),
    sample_every: int | None = _opt(help="Write a sample grid every N iterations, 0 = at the end (default 500)."),
    checkpoint_every: int | None = _opt(help="Checkpoint every N iterations, 0 = at the end (default 500)."),
    keep_checkpoints: int | None = _opt(help="Checkpoints kept (default 2)."),
    eval: bool | None = typer.Option(None, "--eval/--no-eval", help="Final quality table (default on)."),
    eval_num: int | None = _opt(help="Samples per quality-table entry (default 4096 toys, 2000 digits)."),
    eval_steps: str | None = _opt(help="Student step counts in the table, comma-separated (default: the method's, "
                                       "1,2,4 for most; 1 for one-step generators)."),
    stop_after: int | None = _opt(help="Stop after N iterations of this invocation (resume later)."),
    prompts: str | None = _opt(help="Text-to-image teachers: prompt file (.txt one per line, .jsonl, .csv) or "
                                    "image-caption folder; conditions are cached in RUN/cache."),
    resolution: str | None = _opt(help="Diffusers teachers: N or HxW pixels (default: the pipeline's own)."),
    lora_rank: int | None = _opt(help="Diffusers teachers: LoRA rank of the student and fake scores on the teacher's "
                                      "shared weights; 0 = full fine-tuning (default: the recipe)."),
    lora_alpha: float | None = _opt(help="LoRA alpha (default: the rank)."),
    gradient_checkpointing: bool | None = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                       help="Recompute activations of trained diffusers networks "
                                                            "in the backward pass (less memory; default off)."),
    optimizer: str | None = _opt(help="adamw | adamw8bit (bitsandbytes, if installed) (default adamw)."),
    mode: str | None = _opt(help="sCM: distill (sCD, the teacher's velocity) | train (sCT, from data); the same "
                                 "as --opt mode=MODE."),
    opt: list[str] | None = typer.Option(None, "--opt", help="A method option KEY=VALUE (repeatable; see "
                                         "`fewstep methods`)."),
    as_json: bool = JSON_OPT,
):
    """Distill a teacher into a few-step student (no arguments: the built-in default, CD on toy:checkerboard)."""
    from fewstep.training import distill as run_distill
    from fewstep.training.config import load_yaml, parse_option

    values: dict = load_yaml(config) if config is not None else {}
    flags = {"method": method, "teacher": teacher, "out": str(out) if out is not None else None, "data": data,
             "iters": iters, "batch_size": batch_size, "lr": lr, "lr_schedule": lr_schedule, "warmup": warmup,
             "grad_clip": grad_clip, "grad_accum": grad_accum, "mixed_precision": mixed_precision, "ema": ema,
             "ema_decay": ema_decay, "ema_gamma": ema_gamma, "guidance": guidance, "seed": seed, "device": device,
             "log_every": log_every, "sample_every": sample_every, "checkpoint_every": checkpoint_every,
             "keep_checkpoints": keep_checkpoints, "eval": eval, "eval_num": eval_num, "stop_after": stop_after,
             "prompts": prompts, "resolution": resolution, "lora_rank": lora_rank, "lora_alpha": lora_alpha,
             "gradient_checkpointing": gradient_checkpointing, "optimizer": optimizer}
    if eval_steps is not None:
        try:
            flags["eval_steps"] = [int(s) for s in eval_steps.split(",") if s.strip()]
        except ValueError:
            raise FewstepError(f"--eval-steps must be comma-separated integers, got {eval_steps!r}") from None
    if opt or mode is not None:
        options = dict(values.get("options") or {})
        options.update(parse_option(o) for o in opt or ())
        if mode is not None:
            options["mode"] = mode
        flags["options"] = options
    values.update({k: v for k, v in flags.items() if v is not None})
    from accelerate.state import PartialState

    with progress_bar("distilling", None) as bar:

        def progress(iteration: int, total: int, losses: dict):
            if not PartialState().is_main_process:  # one bar and one result for a multi-process launch
                bar.enabled = False
                return
            bar.set_total(total)
            bar.advance(1)
            if iteration % 10 == 0 or iteration == total:
                bar.note(" ".join(f"{k.split('/')[-1] if k.count('/') else k} {v:.4g}" for k, v in losses.items()))

        eval_bar = _Bar("evaluating", None)
        try:
            result = run_distill(values, resume=resume, progress=progress,
                                 progress_eval=lambda: eval_bar.advance(1) if PartialState().is_main_process else None,
                                 status=lambda text: bar.note(text) if PartialState().is_main_process else None)
        finally:
            eval_bar.close()
    result.pop("table_text", None)
    if not PartialState().is_main_process:
        return
    if result.get("interrupted"):
        err_console.print(f"interrupted at iteration {result['iterations']}: checkpoint saved; continue with "
                          f"`{result['resume_with']}`", markup=False, highlight=False, soft_wrap=True)
        if as_json:
            emit(result, True, "")
        raise typer.Exit(130)
    if as_json:
        emit(result, True, "")
        return
    rows = result.get("table") or []
    if rows:
        table = Table(title=f"{result['method']} on {result['teacher']}: {result['iterations']} iterations, "
                            f"{result.get('train_seconds', 0):.0f} s")
        from fewstep.training.report import extra_columns

        extras = extra_columns(rows)
        for col in ("model", "solver", "steps", rows[0]["metric"], *extras):
            table.add_column(col, justify="right" if col not in ("model", "solver") else "left")
        for r in rows:
            table.add_row(r["model"], r["solver"], str(r["steps"]), f"{r['value']:.4f}",
                          *(f"{r[e]:.4f}" if e in r else "" for e in extras))
        out_console.print(table)
    out_console.print(f"run: {result['run']}" + (f"  student: {result['student']}" if result.get("student") else
                                                 f"  (stopped; continue with: {result.get('resume_with')})"),
                      markup=False, highlight=False)


@app.command("methods")
@command
def methods(as_json: bool = JSON_OPT):
    """List the distillation methods and their options (`fewstep distill --method NAME --opt KEY=VALUE`)."""
    import dataclasses

    from fewstep.methods import available_methods, get_method

    rows = []
    for name in available_methods():
        cls = get_method(name)
        opts = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                for f in dataclasses.fields(cls.config_class)}
        rows.append({"name": name, "description": cls.description, "options": opts})
    if as_json:
        emit({"methods": rows}, True, "")
        return
    table = Table(title="distillation methods")
    for col in ("name", "description", "options (defaults)"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["description"], ", ".join(f"{k}={v}" for k, v in r["options"].items()))
    out_console.print(table)


@app.command()
@command
def export(
    run: Path = typer.Argument(..., help="Run directory (or a model directory)."),
    format: str = typer.Option("safetensors", "--format", help="safetensors (fewstep's own) | diffusers (a complete "
                               "pipeline folder with a scheduler for the student's sampler) | lora (diffusers LoRA "
                               "weights for pipe.load_lora_weights)."),
    out: Path = typer.Option(..., "--out", help="New output directory."),
    as_json: bool = JSON_OPT,
):
    """Export a distilled student: fewstep weights + config, a diffusers pipeline, or LoRA weights (+ model card)."""
    from fewstep import api

    result = api.export(run, out, format=format)
    emit(result, as_json, "fewstep export")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: like app(), but parse errors are one line too (exit code 2)."""
    # typer vendors its own click; find its UsageError (the base of every parse error) from a public class
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    try:
        rc = app(args=argv, standalone_mode=False)
    except usage_error as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        err_console.print(f"error: {e.format_message()}{hint}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err_console.print("aborted", markup=False)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
