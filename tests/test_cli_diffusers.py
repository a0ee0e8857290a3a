"""The CLI on a diffusers teacher: `distill --teacher DIR --data/--prompts --lora-rank`, `sample --prompt`,
`export --format diffusers|lora`, and one-line errors (no model offline, prompts for a non-text model)."""

from __future__ import annotations

import json

import pytest
import yaml
from support import assert_one_line_error as one_line_error
from support import cli_run as run
from support import last_json

from fewstep.teachers.random_pipelines import save_caption_folder, save_random_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def test_distill_sample_export_on_a_pipeline_folder(tmp_path):
    pipe = save_random_pipeline("sdxl", tmp_path / "sdxl")
    data = save_caption_folder(tmp_path / "caps")
    runs = tmp_path / "run"
    r = run("distill", "--method", "lcm", "--teacher", pipe, "--data", data, "--iters", 2, "--batch-size", 2,
            "--lora-rank", 4, "--lora-alpha", 8, "--gradient-checkpointing", "--resolution", "16x24", "--out", runs,
            "--sample-every", 0, "--eval-steps", "1", "--json")
    assert r.exit_code == 0, r.stderr
    cfg = yaml.safe_load((runs / "config.yaml").read_text())
    assert cfg["lora_rank"] == 4 and cfg["lora_alpha"] == 8 and cfg["gradient_checkpointing"] is True
    assert cfg["resolution"] == "16x24" and cfg["guidance"] == 7.5  # the text2image LCM recipe's fixed CFG scale
    assert cfg["options"]["guidance_embed"] is False
    student = json.loads((runs / "student" / "config.json").read_text())
    assert student["network"]["lora"] == {**student["network"]["lora"], "rank": 4, "alpha": 8.0}
    assert student["denoiser"]["data_shape"] == [4, 8, 12]

    out = tmp_path / "imgs"
    r = run("sample", "--model", runs, "--prompt", "a cat", "--num", 2, "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    res = last_json(r)
    assert res["prompts"] == ["a cat"] and res["steps"] == 1 and res["solver"] == "fewstep"
    assert res["spacing"] == "trailing" and sorted(p.name for p in out.iterdir()) == [
        "00000.png", "00001.png", "grid.png", "samples.npz"]
    from PIL import Image

    with Image.open(out / "00000.png") as im:
        assert im.size == (24, 16) and im.mode == "RGB"

    for fmt, needle in (("diffusers", "model_index.json"), ("lora", "pytorch_lora_weights.safetensors")):
        r = run("export", runs, "--format", fmt, "--out", tmp_path / fmt, "--json")
        assert r.exit_code == 0, r.stderr
        res = last_json(r)
        assert res["scheduler"] == "LCMScheduler" and any(f.endswith(needle) for f in res["files"])
    one_line_error(run("export", runs, "--format", "lora", "--out", tmp_path / "lora"), "already exists")


def test_flux_teacher_sample_distill_export(tmp_path):
    """A tiny FLUX.1-dev-style pipeline folder: the teacher samples at its guidance 3.5 (the guidance embedding's
    input), a DMD2 LoRA student distils from it (guidance 3.5 unless given), samples and exports as LoRA weights."""
    pipe = save_random_pipeline("flux", tmp_path / "flux")
    r = run("sample", "--teacher", pipe, "--prompt", "a cat", "--num", 2, "--steps", 2, "--out", tmp_path / "t",
            "--json")
    assert r.exit_code == 0, r.stderr
    res = last_json(r)
    assert res["guidance"] == 3.5 and res["steps"] == 2 and res["solver"] == "euler"
    from PIL import Image

    with Image.open(tmp_path / "t" / "00000.png") as im:
        assert im.size == (16, 16)

    data = save_caption_folder(tmp_path / "caps")
    runs = tmp_path / "run"
    r = run("distill", "--method", "dmd2", "--teacher", pipe, "--data", data, "--iters", 2, "--batch-size", 2,
            "--lora-rank", 4, "--gradient-checkpointing", "--resolution", "16x32", "--out", runs, "--sample-every", 0,
            "--eval-steps", "1", "--opt", "steps=2", "--opt", "gan=true", "--json")
    assert r.exit_code == 0, r.stderr
    cfg = yaml.safe_load((runs / "config.yaml").read_text())
    assert cfg["guidance"] == 3.5 and cfg["lora_rank"] == 4 and cfg["resolution"] == "16x32"
    student = json.loads((runs / "student" / "config.json").read_text())
    assert student["network"]["arch"] == "flux" and student["network"]["guidance_embed"] is True
    assert student["denoiser"]["data_shape"] == [4, 8, 16]

    r = run("sample", "--model", runs, "--prompt", "a cat", "--num", 2, "--out", tmp_path / "s", "--json")
    assert r.exit_code == 0, r.stderr
    res = last_json(r)
    assert res["steps"] == 2 and res["solver"] == "fewstep" and res["guidance"] == 1.0
    with Image.open(tmp_path / "s" / "00000.png") as im:
        assert im.size == (32, 16)
    r = run("export", runs, "--format", "lora", "--out", tmp_path / "lora", "--json")
    assert r.exit_code == 0, r.stderr
    assert last_json(r)["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    r = run("distill", "--method", "cd", "--teacher", pipe, "--data", data, "--iters", 1, "--batch-size", 2,
            "--guidance", 2, "--out", tmp_path / "run2", "--sample-every", 0, "--eval-steps", "1")
    assert r.exit_code == 0, r.stderr
    assert yaml.safe_load((tmp_path / "run2" / "config.yaml").read_text())["guidance"] == 2.0  # given: kept


def test_one_line_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    one_line_error(run("sample", "--teacher", "sdxl", "--num", 1), "stabilityai/stable-diffusion-xl-base-1.0",
                   "hf download")
    one_line_error(run("distill", "--teacher", "sd15", "--out", tmp_path / "r"), "not in the local Hugging Face cache")
    assert not (tmp_path / "r").exists()
    one_line_error(run("sample", "--teacher", "digits", "--prompt", "a cat", "--num", 1), "text-to-image model")
    one_line_error(run("export", tmp_path, "--format", "onnx", "--out", tmp_path / "x"), "allowed: safetensors, "
                   "diffusers, lora")
