"""Export a student in fewstep's own format: model.safetensors + config.json (what `fewstep sample --model DIR`
and `fewstep.load_model` read), with a model card."""

from __future__ import annotations

from pathlib import Path

from fewstep.exporters.card import model_card
from fewstep.fileio import atomic_write
from fewstep.models.io import CONFIG, WEIGHTS, save_denoiser


def export_safetensors(den, out: str | Path, rows: list[dict] | None = None, run: dict | None = None) -> dict:
    """Write the student `den` to the new directory `out` (weights, config, README.md); returns the files."""
    out = Path(out)
    save_denoiser(den, out)
    card = model_card(den, "safetensors", out, rows, run)
    atomic_write(out / "README.md", lambda tmp: Path(tmp).write_text(card))
    return {"files": [str(out / WEIGHTS), str(out / CONFIG), str(out / "README.md")]}
