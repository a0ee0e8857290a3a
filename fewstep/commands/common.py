"""What every command shares: one-line errors and exit codes, progress bars on stderr, printing a result (a
table, or one JSON line), and flags generated from a config dataclass.

Conventions for every command: ``--json`` prints one JSON object (the result) as the last line of stdout, with
progress on stderr; exit code 0 on success, 2 on bad input with a one-line error naming the bad value and what
is allowed (``--debug`` shows the traceback), 130 when interrupted, and nothing is written when a command fails.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import typing
from contextlib import ExitStack, contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fewstep.devices import DEVICE_HELP, DTYPE_HELP
from fewstep.errors import FewstepError

out_console = Console()
err_console = Console(stderr=True)
state = {"debug": bool(os.environ.get("FEWSTEP_DEBUG"))}

JSON_OPT = typer.Option(False, "--json", help="Print the result as one JSON object (last line of stdout).")
DEVICE_OPT = typer.Option("auto", "--device", help=DEVICE_HELP + ".")
DTYPE_OPT = typer.Option("auto", "--dtype", help=DTYPE_HELP + ".")


def sub_app(help: str) -> typer.Typer:
    """A command group (`fewstep teacher ...`, `fewstep eval ...`)."""
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None)


def command(fn):
    """Turn library errors into one line on stderr and exit code 2 (1 for unexpected errors)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except FewstepError as e:
            if state["debug"]:
                raise
            err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", markup=False)
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the user gets one line; --debug shows the rest
            if state["debug"]:
                raise
            err_console.print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)",
                              markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


class Bar:
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
    """A `Bar` that is stopped (and its last state printed) when the block ends."""
    bar = Bar(description, total, enabled)
    try:
        yield bar
    finally:
        bar.close()


class StageProgress:
    """Progress callback (stage, n, total): one bar on stderr per stage, the previous one closed first."""

    def __init__(self, labels: dict[str, str] | None = None):
        self.labels = labels or {}
        self._stage = None
        self._stack = ExitStack()
        self._bar = None

    def __call__(self, stage: str, n: int, total: int | None):
        if stage != self._stage:
            self._stack.close()
            self._stack = ExitStack()
            self._bar = self._stack.enter_context(progress_bar(self.labels.get(stage, stage), total))
            self._stage = stage
        self._bar.advance(n)

    def close(self):
        self._stack.close()


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


def print_rows(rows: list[dict], columns: list[str], title: str, *, format_cell=str, right: tuple = ()) -> None:
    """A table with one row per dict (the columns' values through `format_cell(column, value)`)."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left")
    for r in rows:
        table.add_row(*(format_cell(c, r.get(c)) for c in columns))
    out_console.print(table)


# -- flags generated from a config dataclass ------------------------------------------------------------
def _flag_type(hint, cli: str | None):
    """The Python type of a field's flag (without Optional): `cli` "path" -> Path, "int_list" -> str."""
    if cli == "path":
        return Path
    if cli == "int_list":
        return str
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def format_default(value) -> str:
    """A default as a help text shows it: on/off for booleans, 1 for 1.0."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def flag_help(f: dataclasses.Field) -> str:
    """A field's help (metadata["help"]) with "{default}" replaced by its default."""
    text = f.metadata.get("help", "")
    if "{default}" in text and f.default is not dataclasses.MISSING:
        text = text.replace("{default}", format_default(f.default))
    return text


def dataclass_flags(cls) -> list[inspect.Parameter]:
    """One keyword parameter per field of the dataclass `cls` (in field order), defaulting to None so that only
    the flags a user gives override a config: `--name-with-dashes`, typed like the field, its help from the
    field's metadata["help"] (`flag_help`: its default filled in); booleans get `--name/--no-name`. Fields whose
    metadata["cli"] is "none" get no flag; "path" fields take a path, "int_list" fields comma-separated integers
    (see `dataclass_values`)."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        cli = f.metadata.get("cli")
        if cli == "none":
            continue
        typ = _flag_type(hints[f.name], cli)
        flag = "--" + f.name.replace("_", "-")
        help_text = flag_help(f)
        if typ is bool:
            option = typer.Option(None, f"{flag}/--no-{f.name.replace('_', '-')}", help=help_text)
        else:
            option = typer.Option(None, flag, help=help_text, show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=typing.Optional[typ]))  # noqa: UP045 - a runtime type for Typer
    return params


def dataclass_values(cls, given: dict) -> dict:
    """The fields of `cls` set by flags (not None), converted back to the field's type."""
    out = {}
    for f in dataclasses.fields(cls):
        value = given.get(f.name)
        if value is None or f.metadata.get("cli") == "none":
            continue
        cli = f.metadata.get("cli")
        if cli == "path":
            value = str(value)
        elif cli == "int_list":
            flag = "--" + f.name.replace("_", "-")
            try:
                value = [int(s) for s in value.split(",") if s.strip()]
            except ValueError:
                raise FewstepError(f"{flag} must be comma-separated integers, got {given[f.name]!r}") from None
        out[f.name] = value
    return out


def with_signature(fn, params: list[inspect.Parameter]):
    """Give `fn(**kwargs)` the signature Typer reads its options from."""
    fn.__signature__ = inspect.Signature(params)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn
