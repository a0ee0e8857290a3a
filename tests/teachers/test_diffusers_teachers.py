"""Diffusers teachers by alias, hub id or local folder; offline without the model: one line saying how to get it."""

from __future__ import annotations

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.teachers import load_teacher
from fewstep.teachers.diffusers import DIFFUSERS_ALIASES, diffusers_source
from fewstep.teachers.random_pipelines import save_random_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return save_random_pipeline("sd15", tmp_path_factory.mktemp("p") / "sd15")


def test_sources_of_aliases_hub_ids_and_folders(sd15, tmp_path):
    assert DIFFUSERS_ALIASES["sdxl"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert diffusers_source("sdxl") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert diffusers_source("sd15") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert diffusers_source("my-org/my-model") == "my-org/my-model"
    assert diffusers_source(str(sd15)) == str(sd15.resolve())
    assert diffusers_source(str(tmp_path)) is None  # a folder without model_index.json
    for spec in ("digits", "toy:moons", "nope", "/no/such/dir"):
        assert diffusers_source(spec) is None


def test_local_folder_at_its_own_and_another_resolution(sd15):
    den = load_teacher(str(sd15))
    assert den.meta["arch"] == "sd" and den.meta["resolution"] == [16, 16] and den.data_shape == (4, 8, 8)
    assert den.meta["pipeline"] == "StableDiffusionPipeline" and den.meta["source"] == str(sd15)
    wide = load_teacher(str(sd15), resolution="16x32")
    assert wide.data_shape == (4, 8, 16) and wide.meta["resolution"] == [16, 32]
    x = torch.randn(2, *wide.data_shape)
    with torch.no_grad():
        out = wide(x, torch.tensor([900.0, 10.0]), wide.components.encode_prompts(["a", "b"]), guidance=2.0)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert wide.components.decode(out).shape == (2, 3, 16, 32)
    for bad, match in (("15", "multiple of 4"), ("abc", "N or HxW"), ("0x16", "positive")):
        with pytest.raises(FewstepError, match=match):
            load_teacher(str(sd15), resolution=bad)
    with pytest.raises(FewstepError, match="diffusers teachers only"):
        load_teacher("digits", resolution=32)


def test_offline_without_the_model_fails_in_one_line(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    for spec, repo in (("sdxl", DIFFUSERS_ALIASES["sdxl"]), ("someone/some-pipeline", "someone/some-pipeline")):
        with pytest.raises(FewstepError) as e:
            load_teacher(spec)
        msg = str(e.value)
        assert "\n" not in msg and repo in msg and f"hf download {repo}" in msg
        assert "not in the local Hugging Face cache" in msg and "--teacher /path/to/folder" in msg


def test_unknown_teacher_lists_the_diffusers_choices():
    with pytest.raises(FewstepError) as e:
        load_teacher("sd99")
    assert "sdxl" in str(e.value) and "model_index.json" in str(e.value)


def test_a_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(FewstepError, match="cannot load the diffusers pipeline"):
        load_teacher(str(tmp_path))


def test_flux_aliases_and_default_guidance(sd15, tmp_path):
    """FLUX.1-dev's guidance embedding makes FluxPipeline's 3.5 the teacher's default guidance (what a run on it
    uses when it sets none); a Flux transformer without the embedding (schnell's layout) and other teachers have
    none."""
    import json

    assert diffusers_source("flux-dev") == "black-forest-labs/FLUX.1-dev"
    assert diffusers_source("flux-schnell") == "black-forest-labs/FLUX.1-schnell"
    flux = save_random_pipeline("flux", tmp_path / "flux")
    assert load_teacher(str(flux)).meta["default_guidance"] == 3.5
    assert "default_guidance" not in load_teacher(str(sd15)).meta
    config = flux / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "guidance_embeds": False}))  # schnell's layout
    assert "default_guidance" not in load_teacher(str(flux)).meta


def test_random_flux_pipeline_round_trips_through_save_and_load(tmp_path):
    """The tiny Flux pipeline (a letter CLIPTokenizer standing in for T5's, which FluxPipeline only calls) saves and
    reloads with stock diffusers, and the reloaded one computes what the built one does (no dropout left on)."""
    from diffusers import DiffusionPipeline

    from fewstep.teachers.random_pipelines import build_random_pipeline

    built = build_random_pipeline("flux", seed=1)
    assert 5e4 < sum(p.numel() for p in built.transformer.parameters()) < 1e6
    assert built.transformer.config.guidance_embeds and built.transformer.config.in_channels == 16
    assert not any(m.training for m in (built.transformer, built.text_encoder, built.text_encoder_2, built.vae))
    built.save_pretrained(str(tmp_path / "flux"), safe_serialization=True)
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "flux"))
    assert type(loaded).__name__ == "FluxPipeline" and type(loaded.tokenizer_2).__name__ == "CLIPTokenizer"
    for pipe in (built, loaded):
        pipe.set_progress_bar_config(disable=True)
    images = [pipe(["a cat", "two dots"], num_inference_steps=2, height=16, width=16, output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images for pipe in (built, loaded)]
    assert images[0].shape == (2, 3, 16, 16) and torch.isfinite(images[0]).all()
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)
