"""Built-in data: toy distributions, scikit-learn digits, and folders of users' images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.data import DATA_NAMES, get_data, load_image_folder, sample_toy
from fewstep.data.digits import NUM_TEST, load_digits_tensors
from fewstep.data.toy import TOY_NAMES, gaussians8_centers
from fewstep.errors import FewstepError


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toys_are_reproducible_2d_and_bounded(name):
    a = sample_toy(name, 1000, seed=3)
    assert a.shape == (1000, 2) and a.dtype == torch.float32
    torch.testing.assert_close(a, sample_toy(name, 1000, seed=3))
    assert not torch.equal(a, sample_toy(name, 1000, seed=4))
    assert float(a.abs().max()) < 4.5 and 0.5 < float(a.std()) < 2.0


def test_checkerboard_occupies_the_black_squares():
    x = sample_toy("checkerboard", 5000, seed=0)
    parity = (torch.floor(x[:, 0]) + torch.floor(x[:, 1])) % 2
    assert torch.all(parity == 0)
    assert float(x.min()) >= -2 and float(x.max()) <= 2


def test_gaussians8_modes():
    x = sample_toy("gaussians8", 8000, seed=0)
    k = torch.cdist(x, gaussians8_centers()).argmin(1)
    counts = torch.bincount(k, minlength=8).double() / 8000
    assert torch.all((counts - 0.125).abs() < 0.02)


def test_digits_splits_and_resolutions():
    x, y = load_digits_tensors("train", 8)
    xt, yt = load_digits_tensors("test", 8)
    assert x.shape == (1797 - NUM_TEST, 1, 8, 8) and xt.shape == (NUM_TEST, 1, 8, 8)
    assert float(x.min()) >= -1 and float(x.max()) <= 1 and float(x.min()) == -1
    assert set(y.tolist()) == set(range(10)) and set(yt.tolist()) == set(range(10))
    x16, y16 = load_digits_tensors("test", 16)
    assert x16.shape == (NUM_TEST, 1, 16, 16) and torch.equal(y16, yt)
    # the 16x16 version pools back to (nearly) the 8x8 one
    pooled = torch.nn.functional.avg_pool2d(x16, 2)
    assert float((pooled - xt).abs().mean()) < 0.15
    with pytest.raises(FewstepError, match="resolution"):
        load_digits_tensors("train", 12)
    with pytest.raises(FewstepError, match="split"):
        load_digits_tensors("val")


def test_get_data_sources():
    cb = get_data("checkerboard")
    assert cb.name == "toy:checkerboard" and cb.kind == "2d" and not cb.finite
    x, y = cb.sample(16, torch.Generator().manual_seed(0))
    assert x.shape == (16, 2) and y is None
    ref1, ref2 = cb.reference(100), cb.reference(100)
    torch.testing.assert_close(ref1[0], ref2[0])
    d = get_data("digits")
    assert d.kind == "image" and d.shape == (1, 8, 8) and d.num_classes == 10
    xb, yb = d.sample(32, torch.Generator().manual_seed(0))
    assert xb.shape == (32, 1, 8, 8) and yb.shape == (32,)
    assert d.reference()[0].shape[0] == 1797
    assert get_data("digits16").shape == (1, 16, 16)
    assert set(DATA_NAMES) >= {"toy:checkerboard", "toy:spirals", "digits", "digits16"}
    with pytest.raises(FewstepError, match="unknown data 'mnist'"):
        get_data("mnist")


def _write_images(root, names, size=(20, 12), color=(200, 10, 10)):
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, color).save(p)


def test_image_folder_flat_and_labelled(tmp_path):
    flat = tmp_path / "flat"
    _write_images(flat, ["a.png", "b.jpg"])
    x, y, classes = load_image_folder(flat, resolution=8, channels=3)
    assert x.shape == (2, 3, 8, 8) and y is None and classes == []
    assert float(x[0, 0].mean()) == pytest.approx(200 / 127.5 - 1, abs=0.02)
    labelled = tmp_path / "lab"
    _write_images(labelled, ["cat/1.png", "cat/2.png", "dog/1.png"])
    x, y, classes = load_image_folder(labelled, resolution=4, channels=1)
    assert x.shape == (3, 1, 4, 4) and classes == ["cat", "dog"] and y.tolist() == [0, 0, 1]
    src = get_data(str(labelled), resolution=4)
    assert src.num_classes == 2 and src.shape == (3, 4, 4)
    with pytest.raises(FewstepError, match="no images"):
        load_image_folder(_empty(tmp_path), 4)
    with pytest.raises(FewstepError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 4)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "notes.txt").write_text("no images here")
    return d


def test_image_folder_centre_crops(tmp_path):
    img = np.zeros((10, 30, 3), dtype=np.uint8)
    img[:, 10:20] = 255  # white centre square, black sides
    Image.fromarray(img).save(tmp_path / "wide.png")
    x, _, _ = load_image_folder(tmp_path, resolution=10, channels=1)
    assert float(x.mean()) > 0.9  # only the white centre survives the crop
