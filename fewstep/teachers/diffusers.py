"""Diffusers teachers by alias (`sdxl`, `sd15`, ...), hub id (`org/name`) or local pipeline folder."""

from __future__ import annotations

import re
from pathlib import Path

from fewstep.errors import FewstepError

# alias -> Hugging Face hub repository of the pipeline
DIFFUSERS_ALIASES = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sd21-base": "stabilityai/stable-diffusion-2-1-base",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd35-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd35-large": "stabilityai/stable-diffusion-3.5-large",
    "flux-dev": "black-forest-labs/FLUX.1-dev",  # guidance-distilled: the guidance scale is a network input
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",  # timestep-distilled, no guidance input
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def diffusers_source(spec: str) -> str | None:
    """The pipeline source (hub id or local folder) that `spec` names, or None if it names no diffusers pipeline."""
    spec = str(spec)
    if spec in DIFFUSERS_ALIASES:
        return DIFFUSERS_ALIASES[spec]
    path = Path(spec)
    if path.is_dir():
        return str(path.resolve()) if (path / "model_index.json").is_file() else None
    if _HUB_ID.match(spec) and not path.exists():
        return spec
    return None


def load_diffusers_teacher(spec: str, device="cpu", *, resolution=None, dtype=None):
    """A Denoiser over the pipeline `spec` names (with `.components` for text and latents)."""
    from fewstep.models.diffusers_pipeline import denoiser_from_pipeline, load_pipeline

    source = diffusers_source(spec)
    if source is None:
        raise FewstepError(f"{spec!r} is not a diffusers pipeline: give an alias ({', '.join(DIFFUSERS_ALIASES)}), "
                           "a hub id (org/name) or a folder with model_index.json")
    pipe = load_pipeline(source, dtype=dtype, name=spec)
    pipe.to(device)
    return denoiser_from_pipeline(pipe, source, resolution=resolution, name=str(spec))


__all__ = ["DIFFUSERS_ALIASES", "diffusers_source", "load_diffusers_teacher"]
