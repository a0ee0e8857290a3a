"""`fewstep eval fid|stats|clip`: feature-space metrics (Inception FID with optional KID and
precision/recall, reference statistics, CLIP score).

KID and precision/recall are folded into `fid` (`--kid`, `--pr`): they reuse the same Inception
features, which are the expensive part. cli.py calls `register(eval_app)` right after its own eval
commands; helpers from `fewstep.cli` are imported when `register` runs (they are defined by then), so
importing this module never imports cli.py first.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import typer

_STAGE_LABELS = {"samples": "samples -> Inception", "reference": "reference -> Inception",
                 "images": "images -> features"}


class _StageProgress:
    """Progress callback (stage, n, total): one bar on stderr per stage, the previous one closed first."""

    def __init__(self, progress_bar):
        self._progress_bar = progress_bar
        self._stage = None
        self._stack = ExitStack()
        self._bar = None

    def __call__(self, stage: str, n: int, total: int | None):
        if stage != self._stage:
            self._stack.close()
            self._stack = ExitStack()
            self._bar = self._stack.enter_context(self._progress_bar(_STAGE_LABELS.get(stage, stage), total))
            self._stage = stage
        self._bar.advance(n)

    def close(self):
        self._stack.close()


def register(eval_app) -> None:
    """Add `fid`, `stats` and `clip` to the `fewstep eval` Typer app."""
    from fewstep.cli import JSON_OPT, command, emit, progress_bar

    inception_opt = typer.Option(None, "--inception", help="Inception weights: pt_inception-2015-12-05-6726825d.pth "
                                 "(pytorch-fid) or inception-2015-12-05.pt (TorchScript). Default: "
                                 "$TORCH_HOME/hub/checkpoints/ (~/.cache/torch/hub/checkpoints/).")
    resize_opt = typer.Option("clean", "--resize", help="clean (PIL bicubic antialiased, like clean-fid) | legacy "
                              "(bilinear F.interpolate, like pytorch-fid).")
    device_opt = typer.Option(None, "--device", help="cpu | cuda | cuda:N (default: cuda when available).")

    @eval_app.command("fid")
    @command
    def fid(
        samples: str = typer.Option(..., "--samples", help="An image folder, an .npz from `fewstep sample`, or a model "
                                    "(built-in name, model directory or distillation run) sampled --num times."),
        ref: Path = typer.Option(..., "--ref", help="Reference: an image folder, a samples .npz, or a stats .npz from "
                                 "`fewstep eval stats` (same weights and resize)."),
        inception: Path | None = inception_opt,
        resize: str = resize_opt,
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
        device: str | None = device_opt,
        as_json: bool = JSON_OPT,
    ):
        """FID in Inception pool3 features (optionally KID and precision/recall), streamed batch by batch."""
        from fewstep.eval.fid import compute_fid

        bars = _StageProgress(progress_bar)
        try:
            result = compute_fid(samples, ref, inception=inception, resize=resize, num=num, steps=steps, solver=solver,
                                 seed=seed, batch_size=batch_size, guidance=guidance, kid=kid, pr=pr,
                                 save_images=save_images, device=device, progress=bars)
        finally:
            bars.close()
        emit(result, as_json, "fewstep eval fid")

    @eval_app.command("stats")
    @command
    def stats(
        images: Path = typer.Option(..., "--images", help="An image folder or a samples .npz."),
        out: Path = typer.Option(..., "--out", help="New .npz for mu, sigma, N and the protocol."),
        inception: Path | None = inception_opt,
        resize: str = resize_opt,
        batch_size: int = typer.Option(64, "--batch-size", help="Images per Inception batch."),
        save_features: bool = typer.Option(False, "--save-features", help="Also store the features (float32), so "
                                           "KID and precision/recall can use this reference."),
        device: str | None = device_opt,
        as_json: bool = JSON_OPT,
    ):
        """Compute reference Inception statistics once (for `fewstep eval fid --ref STATS.npz`)."""
        from fewstep.eval.fid import reference_stats

        bars = _StageProgress(progress_bar)
        try:
            result = reference_stats(images, out, inception=inception, resize=resize, batch_size=batch_size,
                                     save_features=save_features, device=device, progress=bars)
        finally:
            bars.close()
        emit(result, as_json, "fewstep eval stats")

    @eval_app.command("clip")
    @command
    def clip(
        samples: Path = typer.Option(..., "--samples", help="An image folder or a samples .npz (file order)."),
        prompts: Path = typer.Option(..., "--prompts", help="Text file, one prompt per line (one per image, or one "
                                     "for all)."),
        clip_path: Path = typer.Option(..., "--clip", help="Local CLIP model folder (transformers CLIPModel + "
                                       "tokenizer files); nothing is downloaded."),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per CLIP batch."),
        device: str | None = device_opt,
        as_json: bool = JSON_OPT,
    ):
        """CLIP score: 100 * max(cos(image, prompt), 0), averaged over images."""
        from fewstep.eval.clip_score import compute_clip_score

        bars = _StageProgress(progress_bar)
        try:
            result = compute_clip_score(samples, prompts, clip=clip_path, batch_size=batch_size, device=device,
                                        progress=bars)
        finally:
            bars.close()
        emit(result, as_json, "fewstep eval clip")
