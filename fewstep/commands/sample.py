"""`fewstep sample`: draw samples from a teacher or student with the shared sampler engine."""

from __future__ import annotations

from pathlib import Path

import typer

from fewstep import api
from fewstep.commands.common import DEVICE_OPT, DTYPE_OPT, JSON_OPT, command, emit, progress_bar
from fewstep.errors import FewstepError


def register(app: typer.Typer) -> None:
    app.command("sample")(command(sample))


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
    guidance: float | None = typer.Option(None, help="Classifier-free guidance scale (1 = none; for FLUX.1-dev the "
                                          "guidance embedding's input; default: the model's own, 1 for teachers, "
                                          "3.5 for FLUX.1-dev)."),
    label: int | None = typer.Option(None, help="Class label for every sample (default: cycle classes)."),
    batch_size: int | None = typer.Option(None, help="Samples per network batch (default 1024; 8 for text-to-image "
                                          "models)."),
    out: Path | None = typer.Option(None, help="2-D: a new .npz file; images: a new directory (PNGs + grid.png)."),
    prompt: str | None = typer.Option(None, "--prompt", help="Text-to-image models: the prompt of every sample."),
    prompts: Path | None = typer.Option(None, "--prompts", help="Text-to-image models: a prompt file (.txt one per "
                                        "line, .jsonl, .csv); sample i gets prompt i modulo their number."),
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    compile: bool = typer.Option(False, "--compile", help="torch.compile the network and the VAE decoder (slow "
                                 "first batch, faster after)."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Replay the network's calls from CUDA graphs "
                                     "(fixed-shape few-step sampling; CUDA only)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Convolution weights in channels-last "
                                       "layout (UNets and the VAE)."),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="Decode latents tile by tile (large images on "
                                    "little memory)."),
    decode_batch_size: int | None = typer.Option(None, "--decode-batch-size", help="Latent models: images per VAE "
                                                 "decode call (default: the whole sampling batch)."),
    as_json: bool = JSON_OPT,
):
    """Draw samples from a teacher or student with the shared sampler engine."""
    if (teacher is None) == (model is None):
        raise FewstepError("give exactly one of --teacher NAME|PATH or --model DIR")
    with progress_bar("sampling", num) as bar:
        result = api.sample(teacher or model, num=num, steps=steps, solver=solver, spacing=spacing, seed=seed,
                            guidance=guidance, label=label, batch_size=batch_size, out=out, progress=bar.advance,
                            renoise=renoise, prompt=prompt, prompts=prompts, device=device, dtype=dtype,
                            compile=compile, cuda_graphs=cuda_graphs, channels_last=channels_last,
                            vae_tiling=vae_tiling, decode_batch_size=decode_batch_size)
    emit(result, as_json, "fewstep sample")
