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
