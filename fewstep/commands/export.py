"""`fewstep export`: a distilled student as fewstep weights, a diffusers pipeline folder or LoRA weights."""

from __future__ import annotations

from pathlib import Path

import typer

from fewstep import api
from fewstep.commands.common import JSON_OPT, command, emit


def register(app: typer.Typer) -> None:
    app.command("export")(command(export))


def export(
    run: Path = typer.Argument(..., help="Run directory (or a model directory)."),
    format: str = typer.Option("safetensors", "--format", help="safetensors (fewstep's own) | diffusers (a complete "
                               "pipeline folder with a scheduler for the student's sampler) | lora (diffusers LoRA "
                               "weights for pipe.load_lora_weights)."),
    out: Path = typer.Option(..., "--out", help="New output directory."),
    as_json: bool = JSON_OPT,
):
    """Export a distilled student: fewstep weights + config, a diffusers pipeline, or LoRA weights (+ model card)."""
    emit(api.export(run, out, format=format), as_json, "fewstep export")
