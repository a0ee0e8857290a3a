"""`fewstep eval METRIC|fid|stats|clip`: score samples against a reference.

The toy and digits metrics (`swd`, `mmd`, `energy`, `coverage`, `fd-digits`, `class-coverage`: one subcommand each,
from `fewstep.eval.METRICS`) and the feature-space ones: Inception FID with optional KID and precision/recall
(`--kid`, `--pr`: they reuse the same Inception features, which are the expensive part), reference statistics,
and the CLIP score.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fewstep import api
from fewstep.commands.common import DEVICE_OPT, JSON_OPT, StageProgress, command, emit, sub_app

_STAGE_LABELS = {"samples": "samples -> Inception", "reference": "reference -> Inception",
                 "images": "images -> features"}


def register(app: typer.Typer) -> None:
    from fewstep.eval import METRICS

    eval_app = sub_app("Score samples against a reference (one subcommand per metric).")
    for metric in METRICS:
        eval_app.command(metric)(command(metric_command(metric)))
    eval_app.command("fid")(command(fid))
    eval_app.command("stats")(command(stats))
    eval_app.command("clip")(command(clip))
    app.add_typer(eval_app, name="eval")


def metric_command(metric: str):
    """`fewstep eval METRIC --samples PATH [--ref NAME|PATH]` for one of the built-in metrics."""

    def run(
        samples: Path = typer.Option(..., "--samples", help="Samples: an .npz or an image directory."),
        ref: str | None = typer.Option(None, "--ref", help="Built-in data name or samples path "
                                          "(default: the data the samples' model was trained on)."),
        as_json: bool = JSON_OPT,
    ):
        emit(api.evaluate_samples(metric, samples, ref=ref), as_json, f"fewstep eval {metric}")

    run.__doc__ = f"Score samples with the {metric} metric."
    return run


INCEPTION_OPT = typer.Option(None, "--inception", help="Inception weights: pt_inception-2015-12-05-6726825d.pth "
                             "(pytorch-fid) or inception-2015-12-05.pt (TorchScript). Default: "
                             "$TORCH_HOME/hub/checkpoints/ (~/.cache/torch/hub/checkpoints/).")
RESIZE_OPT = typer.Option("clean", "--resize", help="clean (PIL bicubic antialiased, like clean-fid) | legacy "
                          "(bilinear F.interpolate, like pytorch-fid).")


def fid(
    samples: str = typer.Option(..., "--samples", help="An image folder, an .npz from `fewstep sample`, or a model "
                                "(built-in name, model directory or distillation run) sampled --num times."),
    ref: Path = typer.Option(..., "--ref", help="Reference: an image folder, a samples .npz, or a stats .npz from "
                             "`fewstep eval stats` (same weights and resize)."),
    inception: Path | None = INCEPTION_OPT,
    resize: str = RESIZE_OPT,
    num: int | None = typer.Option(None, "--num", help="Samples to draw when --samples is a model (e.g. 50000)."),
    steps: int | None = typer.Option(None, "--steps", help="Sampling steps (default: the model's own)."),
    solver: str | None = typer.Option(None, "--solver", help="Sampler (default: the model's own)."),
    seed: int = typer.Option(0, "--seed", help="Base seed for sampling (and the KID subsets)."),
    guidance: float | None = typer.Option(None, "--guidance", help="Classifier-free guidance scale when sampling "
                                          "(default: the model's own, 1 for teachers)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per sampling / Inception batch."),
    kid: bool = typer.Option(False, "--kid", help="Also KID (unbiased MMD^2, cubic kernel, 100 subsets)."),
    pr: bool = typer.Option(False, "--pr", help="Also precision/recall (k-NN manifolds, k=3)."),
    save_images: Path | None = typer.Option(None, "--save-images", help="Also write the drawn samples as PNGs "
                                            "to this new directory (models only)."),
    device: str = DEVICE_OPT,
    dtype: str = typer.Option("auto", "--dtype", help="auto | fp32 | bf16 | fp16: the precision a model given as "
                              "--samples runs in (default auto: fp32 for the built-in networks)."),
    as_json: bool = JSON_OPT,
):
    """FID in Inception pool3 features (optionally KID and precision/recall), streamed batch by batch."""
    bars = StageProgress(_STAGE_LABELS)
    try:
        result = api.fid(samples, ref, inception=inception, resize=resize, num=num, steps=steps, solver=solver,
                         seed=seed, batch_size=batch_size, guidance=guidance, kid=kid, pr=pr, save_images=save_images,
                         device=device, dtype=dtype, progress=bars)
    finally:
        bars.close()
    emit(result, as_json, "fewstep eval fid")


def stats(
    images: Path = typer.Option(..., "--images", help="An image folder or a samples .npz."),
    out: Path = typer.Option(..., "--out", help="New .npz for mu, sigma, N and the protocol."),
    inception: Path | None = INCEPTION_OPT,
    resize: str = RESIZE_OPT,
    batch_size: int = typer.Option(64, "--batch-size", help="Images per Inception batch."),
    save_features: bool = typer.Option(False, "--save-features", help="Also store the features (float32), so "
                                       "KID and precision/recall can use this reference."),
    device: str = DEVICE_OPT,
    as_json: bool = JSON_OPT,
):
    """Compute reference Inception statistics once (for `fewstep eval fid --ref STATS.npz`)."""
    bars = StageProgress(_STAGE_LABELS)
    try:
        result = api.reference_stats(images, out, inception=inception, resize=resize, batch_size=batch_size,
                                     save_features=save_features, device=device, progress=bars)
    finally:
        bars.close()
    emit(result, as_json, "fewstep eval stats")


def clip(
    samples: Path = typer.Option(..., "--samples", help="An image folder or a samples .npz (file order)."),
    prompts: Path = typer.Option(..., "--prompts", help="Text file, one prompt per line (one per image, or one "
                                 "for all)."),
    clip_path: Path = typer.Option(..., "--clip", help="Local CLIP model folder (transformers CLIPModel + "
                                   "tokenizer files); nothing is downloaded."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per CLIP batch."),
    device: str = DEVICE_OPT,
    as_json: bool = JSON_OPT,
):
    """CLIP score: 100 * max(cos(image, prompt), 0), averaged over images."""
    bars = StageProgress(_STAGE_LABELS)
    try:
        result = api.clip_score(samples, prompts, clip=clip_path, batch_size=batch_size, device=device,
                                progress=bars)
    finally:
        bars.close()
    emit(result, as_json, "fewstep eval clip")
