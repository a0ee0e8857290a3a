"""`fewstep teacher list|train`: the built-in teachers, and training a flow-matching teacher of your own."""

from __future__ import annotations

from pathlib import Path

import typer

from fewstep import api
from fewstep.commands.common import (
    DEVICE_OPT,
    JSON_OPT,
    command,
    emit,
    print_rows,
    progress_bar,
    sub_app,
)


def register(app: typer.Typer) -> None:
    teacher_app = sub_app("Built-in and home-made teachers: list them, train one.")
    teacher_app.command("list")(command(teacher_list))
    teacher_app.command("train")(command(teacher_train))
    app.add_typer(teacher_app, name="teacher")


def teacher_list(as_json: bool = JSON_OPT):
    """List the built-in teachers shipped with the package."""
    rows = api.list_teachers()
    if as_json:
        emit({"teachers": rows}, True, "")
        return
    print_rows(rows, ["name", "data", "shape", "conditioning", "params"], "built-in teachers")


def teacher_train(
    data: str = typer.Option(..., "--data", help="toy:checkerboard | toy:gaussians8 | toy:moons | toy:spirals | "
                             "digits | digits16 | an image folder."),
    out: Path = typer.Option(..., "--out", help="New directory for model.safetensors + config.json."),
    iters: int | None = typer.Option(None, help="Training iterations (default: per data)."),
    batch_size: int | None = typer.Option(None, help="Batch size (default: per data)."),
    lr: float | None = typer.Option(None, help="Learning rate (default: per data)."),
    resolution: int | None = typer.Option(None, help="Image resolution for image folders."),
    seed: int = typer.Option(0, help="Seed."),
    device: str = DEVICE_OPT,
    dtype: str = typer.Option("auto", "--dtype", help="auto | fp32 | bf16 | fp16: the forward pass's precision "
                              "(autocast; weights stay fp32; default auto: fp32)."),
    as_json: bool = JSON_OPT,
):
    """Train a flow-matching teacher and write safetensors + config."""
    with progress_bar("training teacher", iters) as bar:

        def progress(step: int, total: int, loss: float):
            bar.set_total(total)
            bar.advance(1)
            bar.note(f"loss {loss:.4f}")

        result = api.train_teacher(data, out, iters=iters, batch_size=batch_size, lr=lr, seed=seed,
                                   resolution=resolution, progress=progress, device=device, dtype=dtype)
    emit(result, as_json, "fewstep teacher train")
