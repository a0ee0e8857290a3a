"""`fewstep distill` and `fewstep methods`.

The distill flags are generated: one per `DistillConfig` field (its type, default and help), one per option a
method declares in `cli_options` (sCM's --mode), plus --config, --resume, --opt and --json. A new config field
is one line in `fewstep/training/config.py`.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import typer

from fewstep import api
from fewstep.commands.common import (
    JSON_OPT,
    Bar,
    command,
    dataclass_flags,
    dataclass_values,
    emit,
    err_console,
    out_console,
    print_rows,
    progress_bar,
    with_signature,
)
from fewstep.training.config import DistillConfig, parse_option

KW = inspect.Parameter.KEYWORD_ONLY
# the quality table's own columns; any other key of a row is a secondary metric (e.g. mode coverage)
_ROW_KEYS = ("model", "solver", "steps", "metric", "value", "n_samples")


def register(app: typer.Typer) -> None:
    app.command("distill")(command(with_signature(distill, distill_parameters())))
    app.command("methods")(command(methods))


def method_flags() -> dict[str, str]:
    """Flags that set one method option, from every method's `cli_options` (name -> help). A name that is
    already a flag (a config field, --config, --resume, --opt, --json) is left to `--opt NAME=VALUE`."""
    import dataclasses

    from fewstep.methods import available_methods, get_method

    taken = {f.name for f in dataclasses.fields(DistillConfig)} | {"config", "resume", "opt", "as_json", "json"}
    flags: dict[str, str] = {}
    for name in available_methods():
        for option, help_text in get_method(name).cli_options.items():
            if option not in taken:
                flags.setdefault(option, help_text)
    return flags


def distill_parameters() -> list[inspect.Parameter]:
    """The distill command's parameters: the config's fields (--config and --resume after --out), the methods'
    own options, --opt and --json."""
    fields = dataclass_flags(DistillConfig)
    at = next(i for i, p in enumerate(fields) if p.name == "out") + 1
    cli_only = [
        inspect.Parameter("config", KW, annotation=Path | None, default=typer.Option(
            None, "--config", help="YAML recipe of config fields; flags override it.", show_default=False)),
        inspect.Parameter("resume", KW, annotation=bool, default=typer.Option(
            False, "--resume", help="Continue the run in --out from its latest checkpoint.")),
    ]
    own = [inspect.Parameter(name, KW, annotation=str | None, default=typer.Option(
        None, "--" + name.replace("_", "-"), help=help_text, show_default=False))
        for name, help_text in method_flags().items()]
    tail = [
        inspect.Parameter("opt", KW, annotation=list[str] | None, default=typer.Option(
            None, "--opt", help="A method option KEY=VALUE (repeatable; see `fewstep methods`).")),
        inspect.Parameter("as_json", KW, annotation=bool, default=JSON_OPT),
    ]
    return fields[:at] + cli_only + fields[at:] + own + tail


def distill(**flags):
    """Distill a teacher into a few-step student (no arguments: the built-in default, CD on toy:checkerboard)."""
    from accelerate.state import PartialState

    config, resume, opt, as_json = flags.pop("config"), flags.pop("resume"), flags.pop("opt"), flags.pop("as_json")
    values = dataclass_values(DistillConfig, flags)
    options = dict(parse_option(o) for o in opt or ())  # set on top of the recipe file's options
    options.update({k: flags[k] for k in method_flags() if flags.get(k) is not None})
    with progress_bar("distilling", None) as bar:

        def progress(iteration: int, total: int, losses: dict):
            if not PartialState().is_main_process:  # one bar and one result for a multi-process launch
                bar.enabled = False
                return
            bar.set_total(total)
            bar.advance(1)
            if iteration % 10 == 0 or iteration == total:
                bar.note(" ".join(f"{k.split('/')[-1] if k.count('/') else k} {v:.4g}" for k, v in losses.items()))

        eval_bar = Bar("evaluating", None)
        try:
            result = api.distill(config, resume=resume, progress=progress,
                                 progress_eval=lambda: eval_bar.advance(1) if PartialState().is_main_process else None,
                                 status=lambda text: bar.note(text) if PartialState().is_main_process else None,
                                 update_options=options or None, **values)
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
        extras = sorted({k for r in rows for k in r if k not in _ROW_KEYS})
        metric = rows[0]["metric"]

        def cell(col, value):
            if col in ("model", "solver", "steps"):
                return str(value)
            return "" if value is None else f"{value:.4f}"

        shown = [{**r, metric: r["value"]} for r in rows]
        print_rows(shown, ["model", "solver", "steps", metric, *extras],
                   f"{result['method']} on {result['teacher']}: {result['iterations']} iterations, "
                   f"{result.get('train_seconds', 0):.0f} s", format_cell=cell, right=("steps", metric, *extras))
    out_console.print(f"run: {result['run']}" + (f"  student: {result['student']}" if result.get("student") else
                                                 f"  (stopped; continue with: {result.get('resume_with')})"),
                      markup=False, highlight=False)


def methods(as_json: bool = JSON_OPT):
    """List the distillation methods and their options (`fewstep distill --method NAME --opt KEY=VALUE`)."""
    rows = api.list_methods()
    if as_json:
        emit({"methods": rows}, True, "")
        return
    print_rows([{**r, "options (defaults)": ", ".join(f"{k}={v}" for k, v in r["options"].items())} for r in rows],
               ["name", "description", "options (defaults)"], "distillation methods")
