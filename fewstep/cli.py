"""The `fewstep` command line: the Typer app, assembled from `fewstep/commands/` (one module per command group;
each command parses its flags, calls one `fewstep.api` function and prints the result). The conventions every
command follows (--json, exit codes, one-line errors) are in `fewstep/commands/common.py`."""

from __future__ import annotations

import sys

import typer

from fewstep.commands import common, distill, evaluate, export, pairs, sample, teacher

app = typer.Typer(
    name="fewstep",
    help="Distill many-step diffusion and flow teachers into 1-4 step students.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    if debug:
        common.state["debug"] = True


for _group in (sample, pairs, distill, export, teacher, evaluate):  # the order of `fewstep --help`
    _group.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: like app(), but parse errors are one line too (exit code 2)."""
    # typer vendors its own click; find its UsageError (the base of every parse error) from a public class
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    try:
        rc = app(args=argv, standalone_mode=False)
    except usage_error as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        common.err_console.print(f"error: {e.format_message()}{hint}", markup=False, highlight=False,
                                 soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        common.err_console.print("aborted", markup=False)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
