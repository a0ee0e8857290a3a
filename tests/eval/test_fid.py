"""FID end to end with a random-weight FID Inception (the real weights are not available offline):
`fewstep eval stats` and `fewstep eval fid` on an image folder, a samples .npz and a model spec
(streamed), protocol records and refusals, and the sample sources behind them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from support import assert_one_line_error
from support import cli_run as run
from support import ok_json as last_json

from fewstep import api
from fewstep.errors import FewstepError
from fewstep.eval.fid import load_reference_stats
from fewstep.eval.inception import PTH_NAME, TORCHSCRIPT_NAME, file_sha256
from fewstep.eval.sources import ImageFolderSamples, ModelSamples, NpzSamples, open_samples

SEED, STEPS, NUM, BATCH = 3, 2, 6, 4


@pytest.fixture(scope="module")
def work(tmp_path_factory, inception_pth, digit_images):
    """Digits-teacher samples written by `fewstep sample`, real digits as PNGs, and reference stats of the samples."""
    root = tmp_path_factory.mktemp("fid")
    api.sample("digits", num=NUM, steps=STEPS, seed=SEED, batch_size=BATCH, out=root / "teacher")
    real = root / "real"
    real.mkdir()
    for i, img in enumerate(digit_images[0][:NUM]):
        a = ((img[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        Image.fromarray(a).save(real / f"{i:03d}.png")
    r = run("eval", "stats", "--images", root / "teacher", "--out", root / "teacher_stats.npz",
            "--inception", inception_pth, "--save-features", "--batch-size", 4, "--json")
    return {"root": root, "teacher": root / "teacher", "real": real, "stats": root / "teacher_stats.npz",
            "stats_result": last_json(r)}


def test_stats_file_records_the_protocol(work, inception_pth):
    res = work["stats_result"]
    assert res["n"] == NUM and res["includes_features"] is True
    proto = res["protocol"]
    assert proto["weights_sha256"] == file_sha256(inception_pth)
    assert proto["resize"] == "clean" and proto["n"] == NUM and proto["image_size"] == "8x8x1"
    assert proto["weights_format"] == "pytorch-fid state dict" and proto["feature_dim"] == 2048
    st = load_reference_stats(work["stats"])
    assert st["mu"].shape == (2048,) and st["sigma"].shape == (2048, 2048) and st["n"] == NUM
    assert st["features"].shape == (NUM, 2048)
    np.testing.assert_allclose(st["mu"], st["features"].double().mean(0).numpy(), rtol=1e-6, atol=1e-6)
    # never overwritten
    r = run("eval", "stats", "--images", work["teacher"], "--out", work["stats"], "--inception", inception_pth)
    assert_one_line_error(r, "already exists")


def test_fid_of_a_model_streams_the_same_samples(work, inception_pth):
    """Sampling `digits` on the fly (batches of 4: 4 + 2) gives the images `fewstep sample` wrote: FID 0
    against their stats, precision = recall = 1, and --save-images writes the same pixels."""
    saved = work["root"] / "saved"
    r = run("eval", "fid", "--samples", "digits", "--num", NUM, "--steps", STEPS, "--seed", SEED, "--batch-size", BATCH,
            "--ref", work["stats"], "--inception", inception_pth, "--kid", "--pr", "--save-images", saved, "--json")
    res = last_json(r)
    assert res["metric"] == "fid" and res["value"] == res["fid"]
    assert res["fid"] == pytest.approx(0.0, abs=1e-6)
    assert res["precision"] == 1.0 and res["recall"] == 1.0
    assert np.isfinite(res["kid"])
    assert res["n_samples"] == NUM and res["n_ref"] == NUM and res["seed"] == SEED
    assert res["samples"] == {"kind": "model", "model": "digits", "num": NUM, "steps": STEPS, "solver": "heun",
                              "spacing": "uniform", "renoise": "fresh", "seed": SEED, "guidance": 1.0,
                              "device": "cpu", "dtype": "fp32"}
    assert res["ref"]["kind"] == "stats" and res["ref"]["path"] == str(work["stats"])
    proto = res["protocol"]
    assert proto["weights_sha256"] == file_sha256(inception_pth) and proto["resize"] == "clean"
    assert proto["feature_extractor"].startswith("inception-v3-2015-12-05 pool3")
    assert proto["kid"]["subset_size"] == NUM and proto["precision_recall"]["k"] == 3
    assert res["saved_images"] == str(saved)
    for name in sorted(p.name for p in saved.iterdir()):
        with Image.open(saved / name) as a, Image.open(work["teacher"] / name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), name


def test_fid_from_npz_and_image_folders(work, inception_pth):
    # the .npz `fewstep sample` wrote holds the same images (as floats): FID 0 against their stats
    res = last_json(run("eval", "fid", "--samples", work["teacher"] / "samples.npz", "--ref", work["stats"],
                        "--inception", inception_pth, "--json"))
    assert res["fid"] == pytest.approx(0.0, abs=1e-6) and res["samples"]["kind"] == "npz"
    assert res["samples"]["model"] == "digits"
    # real digits against teacher samples given as an image folder (not stats): positive, both sides streamed
    res = last_json(run("eval", "fid", "--samples", work["real"], "--ref", work["teacher"], "--inception",
                        inception_pth, "--kid", "--pr", "--json"))
    assert res["fid"] > 0 and res["samples"]["kind"] == "images" and res["ref"]["kind"] == "images"
    assert res["ref"]["num"] == NUM and res["protocol"]["image_size"] == "8x8x1"
    assert 0.0 <= res["precision"] <= 1.0 and 0.0 <= res["recall"] <= 1.0


def test_reference_with_another_protocol_is_refused(work, inception_pth, tmp_path):
    r = run("eval", "fid", "--samples", work["teacher"], "--ref", work["stats"], "--inception", inception_pth,
            "--resize", "legacy")
    assert_one_line_error(r, "resize=clean", "resize=legacy", "not comparable")
    # same file, other weights: rewrite the stats with a different recorded hash
    with np.load(work["stats"], allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    proto = json.loads(str(arrays["protocol"]))
    arrays["protocol"] = np.array(json.dumps({**proto, "weights_sha256": "0" * 64}))
    np.savez(tmp_path / "other.npz", **arrays)
    assert_one_line_error(run("eval", "fid", "--samples", work["teacher"], "--ref", tmp_path / "other.npz",
                              "--inception", inception_pth), "weights_sha256=000000000000")
    # no protocol at all
    np.savez(tmp_path / "bare.npz", mu=arrays["mu"], sigma=arrays["sigma"])
    assert_one_line_error(run("eval", "fid", "--samples", work["teacher"], "--ref", tmp_path / "bare.npz",
                              "--inception", inception_pth), "records no protocol")
    # KID/PR need the features
    del arrays["features"]
    arrays["protocol"] = np.array(json.dumps(proto))
    np.savez(tmp_path / "nofeat.npz", **arrays)
    assert_one_line_error(run("eval", "fid", "--samples", work["teacher"], "--ref", tmp_path / "nofeat.npz",
                              "--inception", inception_pth, "--kid"), "--save-features")


def test_missing_weights_one_line(work, monkeypatch, tmp_path):
    import tempfile

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(tmp_path / "dnnlib"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = run("eval", "fid", "--samples", work["teacher"], "--ref", work["stats"])
    assert_one_line_error(r, PTH_NAME, TORCHSCRIPT_NAME, str(tmp_path / "torch" / "hub" / "checkpoints"))
    r = run("eval", "stats", "--images", work["teacher"], "--out", tmp_path / "s.npz")
    assert_one_line_error(r, PTH_NAME)
    assert not (tmp_path / "s.npz").exists()


def test_bad_inputs_are_one_line(work, inception_pth, tmp_path):
    pth = ("--inception", inception_pth)
    assert_one_line_error(run("eval", "fid", "--samples", "digits", "--ref", work["stats"], *pth), "--num")
    assert_one_line_error(run("eval", "fid", "--samples", work["teacher"], "--ref", tmp_path / "none", *pth),
                          "does not exist")
    assert_one_line_error(run("eval", "fid", "--samples", "no-such-model", "--num", 4, "--ref", work["stats"], *pth),
                          "no-such-model")
    assert_one_line_error(run("eval", "fid", "--samples", work["teacher"], "--num", 4, "--ref", work["stats"], *pth),
                          "applies to models")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.png").write_bytes(b"")
    assert_one_line_error(run("eval", "fid", "--samples", "digits", "--num", 4, "--ref", work["stats"], *pth,
                              "--save-images", tmp_path / "taken"), "already exists")
    assert_one_line_error(run("eval", "stats", "--images", work["teacher"], "--out", tmp_path / "s.txt", *pth), ".npz")
    assert_one_line_error(run("eval", "fid", "--samples", work["teacher"], "--ref", work["stats"], *pth,
                              "--device", "abacus"), "--device")
    if not torch.cuda.is_available():
        assert_one_line_error(run("eval", "fid", "--samples", work["teacher"], "--ref", work["stats"], *pth,
                                  "--device", "cuda"), "not available")
    assert_one_line_error(run("eval", "fid", "--samples", "toy:checkerboard", "--num", 4, "--ref", work["stats"],
                              *pth), "images")
    # precision/recall needs more than k samples: refused before sampling, so no --save-images are left behind
    assert_one_line_error(run("eval", "fid", "--samples", "digits", "--num", 3, "--pr", "--ref", work["stats"], *pth,
                              "--save-images", tmp_path / "pr_imgs"), "--pr")
    assert not (tmp_path / "pr_imgs").exists()


def test_model_source_matches_generate():
    from fewstep.sampling import generate

    src = ModelSamples("digits", 7, steps=STEPS, seed=SEED, batch_size=3)
    streamed = list(src.batches())
    assert [b.shape[0] for b in streamed] == [3, 3, 1]
    den = api.load_model("digits")
    same_batches, labels = generate(den, 7, steps=STEPS, solver=src.solver, seed=SEED, batch_size=3)
    assert torch.equal(torch.cat(streamed), same_batches)
    assert labels.tolist() == [i % 10 for i in range(7)]
    # per-sample seeds: other batch sizes give the same samples up to float round-off
    one_batch, _ = generate(den, 7, steps=STEPS, solver=src.solver, seed=SEED, batch_size=7)
    torch.testing.assert_close(torch.cat(streamed), one_batch, rtol=0, atol=1e-5)


def test_open_samples_kinds(work, tmp_path):
    assert isinstance(open_samples(work["teacher"]), ImageFolderSamples)
    assert isinstance(open_samples(work["teacher"] / "samples.npz"), NpzSamples)
    assert isinstance(open_samples("digits", num=2, steps=1), ModelSamples)
    assert open_samples(work["teacher"]).total == NUM  # grid.png is not a sample
    # a folder `fewstep sample` wrote without per-sample PNGs: its samples.npz
    no_pngs = tmp_path / "no_pngs"
    api.sample("digits", num=3, steps=1, out=no_pngs)
    for p in no_pngs.glob("0*.png"):
        p.unlink()
    src = open_samples(no_pngs)
    assert isinstance(src, NpzSamples) and src.total == 3
    # a distillation run directory (config.yaml, sample grids, student/): sampled through api.load_model
    import shutil

    from fewstep.teachers import teacher_path

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("method: test\n")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(run_dir / "samples_000100.png")
    shutil.copytree(teacher_path("digits"), run_dir / "student")
    src = open_samples(run_dir, num=3, steps=1, seed=SEED, batch_size=3)
    assert isinstance(src, ModelSamples) and src.describe()["model"] == str(run_dir)
    teacher = open_samples("digits", num=3, steps=1, seed=SEED, batch_size=3)
    assert torch.equal(next(iter(src.batches())), next(iter(teacher.batches())))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FewstepError, match="not an .npz"):
        open_samples(tmp_path / "notes.txt")
    # a folder with a model's config.json is a model, even when it holds sample PNGs (run directories do)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(model_dir / "grid.png")
    with pytest.raises(FewstepError):
        open_samples(model_dir, num=2)
