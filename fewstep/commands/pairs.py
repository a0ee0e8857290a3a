"""`fewstep pairs`: make (or finish) a sharded set of teacher (noise, sample) pairs on disk."""

from __future__ import annotations

from pathlib import Path

import typer

from fewstep import api
from fewstep.commands.common import DEVICE_OPT, DTYPE_OPT, JSON_OPT, command, emit, progress_bar


def register(app: typer.Typer) -> None:
    app.command("pairs")(command(pairs))


def pairs(
    teacher: str = typer.Option(..., "--teacher", help="Built-in teacher name, model directory or run directory."),
    num: int = typer.Option(..., "--num", help="Number of pairs in the set."),
    out: Path = typer.Option(..., "--out", help="The pair set directory: new, or one to finish (same arguments)."),
    steps: int | None = typer.Option(None, help="Solver steps (default: the teacher's own, 50 for built-ins)."),
    solver: str = typer.Option("heun", help="euler | heun | dpm++2m (an accurate ODE solver)."),
    spacing: str = typer.Option("uniform", help="Time spacing: uniform | karras | trailing | shifted."),
    seed: int = typer.Option(0, help="Base seed; pair i starts from the noise `fewstep sample` uses for sample i."),
    guidance: float = typer.Option(1.0, help="Classifier-free guidance scale of the teacher (1 = none)."),
    shard_size: int = typer.Option(4096, "--shard-size", help="Pairs per shard file."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Pairs per network batch."),
    worker: int = typer.Option(0, "--worker", help="Make only the shards j with j mod WORKERS = WORKER (0-based)."),
    workers: int = typer.Option(1, "--workers", help="Machines sharing the set (each makes its shards)."),
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    as_json: bool = JSON_OPT,
):
    """Make teacher (noise, sample) pairs as sharded safetensors; re-run the same command to finish a set."""
    with progress_bar("pairs", None) as bar:

        def progress(n: int, total: int):
            bar.set_total(total)
            bar.advance(n)

        result = api.pairs(teacher, out, num=num, steps=steps, solver=solver, spacing=spacing, seed=seed,
                           guidance=guidance, shard_size=shard_size, batch_size=batch_size, worker=worker,
                           workers=workers, progress=progress, device=device, dtype=dtype)
    emit(result, as_json, "fewstep pairs")
