"""fewstep's own export format: weights + config that load back to the same student, and the one model card."""

from __future__ import annotations

import pytest
import torch

import fewstep
from fewstep.errors import FewstepError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cd"
    fewstep.distill(method="cd", teacher="toy:checkerboard", iters=3, batch_size=16, out=str(out), eval_num=256,
                    eval_steps=[1], sample_every=0, log_every=1)
    return out


def test_export_loads_back_to_the_same_student(run, tmp_path):
    res = fewstep.export(run, tmp_path / "exp", format="safetensors")
    assert res["format"] == "safetensors" and {p.split("/")[-1] for p in res["files"]} == {
        "model.safetensors", "config.json", "README.md"}
    a, b = fewstep.load_model(run), fewstep.load_model(tmp_path / "exp")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert a.meta == b.meta


def test_the_model_card_has_the_runs_metrics_time_and_losses(run, tmp_path):
    fewstep.export(run, tmp_path / "exp", format="safetensors")
    card = (tmp_path / "exp" / "README.md").read_text()
    assert card.startswith("# fewstep student (cd)")
    assert "distilled from: toy:checkerboard" in card and f"`fewstep sample --model {tmp_path / 'exp'}" in card
    assert "## Metrics" in card and "| teacher (best) | heun | 50 | swd |" in card
    assert "| student | fewstep | 1 |" in card
    assert "Training: " in card and "student/loss" in card
    assert "| student | fewstep | 1 | swd |" in card.split("\n\n")[-2]  # the table ends before the run's lines


def test_export_refuses_an_existing_output_and_an_unknown_format(run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    with pytest.raises(FewstepError, match="already exists"):
        fewstep.export(run, tmp_path / "taken")
    with pytest.raises(FewstepError, match="unknown --format 'onnx'; allowed: safetensors, diffusers, lora"):
        fewstep.export(run, tmp_path / "new", format="onnx")
    assert not (tmp_path / "new").exists()
