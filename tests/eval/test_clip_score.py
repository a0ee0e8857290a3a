"""CLIP score with a tiny random CLIP saved to a local folder (offline): preprocessing as transformers'
image processor does it, the 100 * max(cos, 0) convention, the CLI and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fewstep.cli import app
from fewstep.errors import FewstepError
from fewstep.eval.clip_score import CONVENTION, CLIPScorer, compute_clip_score, read_prompts
from fewstep.outputs import save_samples

runner = CliRunner()
PROMPTS = ["a photo of a cat", "the digit three", "a red car", "th th th"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from fewstep.teachers.random_pipelines import letter_tokenizer

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(root)
    # hand-made byte-level BPE vocabulary: single letters, letters ending a word (</w>) and one merge
    letter_tokenizer().save_pretrained(root)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def images_npz(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    out = tmp_path_factory.mktemp("clip_samples") / "s.npz"
    save_samples(out, x, None, {"model": "test"})
    return out, x


def test_preprocessing_matches_transformers_image_processor(tiny_clip, images_npz):
    from transformers import CLIPImageProcessorPil

    from fewstep.outputs import to_uint8

    _, x = images_npz
    scorer = CLIPScorer(tiny_clip)
    ours = scorer.pixel_values(x)
    proc = CLIPImageProcessorPil.from_pretrained(str(tiny_clip))
    theirs = proc(images=list(to_uint8(x)), return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (4, 3, 32, 32)
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)
    # non-square images: transformers truncates the long side (int), and the crop follows
    for h, w in ((61, 40), (40, 61)):
        rect = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h)) * 2 - 1
        theirs = proc(images=list(to_uint8(rect)), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(scorer.pixel_values(rect), theirs.float(), rtol=0, atol=1e-5)
    # greyscale images are repeated to RGB
    grey = scorer.pixel_values(x[:, :1])
    torch.testing.assert_close(grey, scorer.pixel_values(x[:, :1].repeat(1, 3, 1, 1)))


def test_score_is_100_max_cos_0(tiny_clip, images_npz):
    path, x = images_npz
    res = compute_clip_score(path, PROMPTS, clip=tiny_clip)
    scorer = CLIPScorer(tiny_clip)
    with torch.no_grad():
        enc = scorer.tokenizer(PROMPTS, padding=True, return_tensors="pt")
        img = scorer.model.get_image_features(pixel_values=scorer.pixel_values(x))
        txt = scorer.model.get_text_features(**enc)
    if not isinstance(img, torch.Tensor):  # transformers 5 returns a model output with the projection pooled
        img, txt = img.pooler_output, txt.pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1).double()
    expected = (100 * cos.clamp_min(0)).mean().item()
    assert res["value"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert res["mean_cosine"] == pytest.approx(cos.mean().item(), rel=1e-5, abs=1e-7)
    assert res["metric"] == "clip" and res["n_samples"] == 4 and res["lower_is_better"] is False
    assert res["protocol"]["convention"] == CONVENTION
    assert res["protocol"]["model"]["path"] == str(tiny_clip)
    assert 0.0 <= res["value"] <= 100.0


def test_cli_clip_json_and_errors(tiny_clip, images_npz, tmp_path):
    path, _ = images_npz
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    r = runner.invoke(app, ["eval", "clip", "--samples", str(path), "--prompts", str(prompts), "--clip", str(tiny_clip),
                            "--batch-size", "3", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["prompts"] == str(prompts) and res["protocol"]["convention"] == CONVENTION
    weights = res["protocol"]["model"]["weights_sha256"]
    assert weights and all(len(v) == 64 for v in weights.values()) and "seed" in res
    assert res["value"] == pytest.approx(compute_clip_score(path, PROMPTS, clip=tiny_clip)["value"], rel=1e-5)
    one = tmp_path / "one.txt"
    one.write_text("a photo\n")
    r1 = compute_clip_score(path, one, clip=tiny_clip)
    assert r1["n_samples"] == 4  # a single prompt applies to every image
    bad = tmp_path / "three.txt"
    bad.write_text("a\nb\nc\n")
    for args, needle in [((path, bad, tiny_clip), "4 images but 3 prompts"),
                         ((path, prompts, tmp_path / "no-clip"), "not a CLIP model folder"),
                         ((tmp_path / "missing.npz", prompts, tiny_clip), "image folder or a samples .npz")]:
        r = runner.invoke(app, ["eval", "clip", "--samples", str(args[0]), "--prompts", str(args[1]),
                                "--clip", str(args[2])], catch_exceptions=False)
        assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(FewstepError, match="no prompts"):
        read_prompts(empty)


def test_image_folder_in_file_order(tiny_clip, images_npz, tmp_path):
    from PIL import Image

    from fewstep.outputs import to_uint8

    _, x = images_npz
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, a in enumerate(to_uint8(x)):
        Image.fromarray(a).save(folder / f"{i:02d}.png")
    from_folder = compute_clip_score(folder, PROMPTS, clip=tiny_clip)
    from_npz = compute_clip_score(images_npz[0], PROMPTS, clip=tiny_clip)
    assert from_folder["value"] == pytest.approx(from_npz["value"], rel=1e-6)
    assert np.isfinite(from_folder["clip_score_std"])
