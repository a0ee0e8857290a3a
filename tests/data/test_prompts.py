"""Prompt files, image-caption folders and the on-disk caches of text conditions and VAE latents."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.data.prompts import (
    TextConditionSource,
    load_image_at,
    read_prompt_rows,
    text_condition_source,
)
from fewstep.errors import FewstepError
from fewstep.teachers import load_teacher
from fewstep.teachers.random_pipelines import save_caption_folder, save_random_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return load_teacher(save_random_pipeline("sdxl", tmp_path_factory.mktemp("p") / "sdxl"))


def test_prompt_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert [r.prompt for r in read_prompt_rows(tmp_path / "p.txt")] == ["a cat", "a dog"]
    (tmp_path / "img.png").write_bytes(b"")
    lines = [json.dumps({"caption": "x", "image": "img.png"}), "", json.dumps("y")]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    rows = read_prompt_rows(tmp_path / "p.jsonl")
    assert [r.prompt for r in rows] == ["x", "y"] and rows[0].image == tmp_path / "img.png" and rows[1].image is None
    (tmp_path / "p.csv").write_text('text,file_name\n"a, b",img.png\nc,\n')
    rows = read_prompt_rows(tmp_path / "p.csv")
    assert [r.prompt for r in rows] == ["a, b", "c"] and rows[0].image is not None and rows[1].image is None


@pytest.mark.parametrize("name,content,match", [
    ("p.jsonl", '{"nope": 1}\n', "no prompt field"),
    ("p.jsonl", "{bad\n", "line 1 is not JSON"),
    ("p.csv", "a,b\n1,2\n", "header with a prompt column"),
    ("p.txt", "\n\n", "holds no prompts"),
    ("p.yaml", "a: b\n", "unknown prompt file type"),
    ("p.jsonl", '{"prompt": "x", "image": "missing.png"}\n', "does not exist"),
])
def test_prompt_file_errors(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(FewstepError, match=match):
        read_prompt_rows(tmp_path / name)
    with pytest.raises(FewstepError, match="does not exist"):
        read_prompt_rows(tmp_path / "missing.txt")


def test_caption_folders(tmp_path):
    folder = save_caption_folder(tmp_path / "a", captions=["one", "two"])
    rows = read_prompt_rows(folder)
    assert [r.prompt for r in rows] == ["one", "two"] and all(r.image.is_file() for r in rows)
    (folder / "metadata.jsonl").unlink()
    with pytest.raises(FewstepError, match="no captions"):
        read_prompt_rows(folder)
    (folder / "000.txt").write_text("beside\n")
    assert [(r.prompt, r.image.name) for r in read_prompt_rows(folder)] == [("beside", "000.png")]


def test_images_cover_and_centre_crop(tmp_path):
    from PIL import Image

    arr = torch.zeros(10, 40, 3, dtype=torch.uint8)
    arr[:, 18:22] = 255  # a narrow white band in the middle of a wide image: columns 2.4-5.6 after the crop
    Image.fromarray(arr.numpy()).save(tmp_path / "w.png")
    x = load_image_at(tmp_path / "w.png", 8, 8)
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert x[:, :, 3:5].mean() > 0.9 and x[:, :, 0].mean() < -0.9  # the band stays centred, the sides are cropped


def test_conditions_and_latents_are_cached_once(teacher, tmp_path, monkeypatch):
    data = save_caption_folder(tmp_path / "caps", captions=["a cat", "a dog", "a cat"])
    parts = teacher.components
    calls = {"text": 0, "images": 0}
    encode_prompts, encode_images = parts.encode_prompts, parts.encode_images

    def counting_prompts(prompts, **kw):
        calls["text"] += len(prompts)
        return encode_prompts(prompts, **kw)

    def counting_images(images, **kw):
        calls["images"] += images.shape[0]
        return encode_images(images, **kw)

    parts.fingerprint()  # the probe encodings are not part of the count
    monkeypatch.setattr(parts, "encode_prompts", counting_prompts)
    monkeypatch.setattr(parts, "encode_images", counting_images)
    src = text_condition_source(parts, prompts=None, data=str(data), need_images=True, cache_dir=tmp_path / "cache",
                                method="cd")
    src.prepare()
    assert calls == {"text": 2, "images": 3}  # each distinct prompt once; every image once
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["latents", "text"]
    x0, cond = src.sample(5, torch.Generator().manual_seed(0))
    assert x0.shape == (5, 4, 8, 8) and cond["prompt_embeds"].shape == (5, 16, 32)
    # rows are the prompts' own conditions, and x0 and conditions come from the same rows
    idx = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(0))
    ref = encode_prompts(["a cat", "a dog", "a cat"])
    torch.testing.assert_close(cond["prompt_embeds"], ref["prompt_embeds"][idx])
    # a second source (a resumed run, another process) reads the caches without encoding anything
    again = TextConditionSource(read_prompt_rows(data), parts, tmp_path / "cache", need_images=True)
    again.prepare(compute=False)
    x0b, condb = again.sample(5, torch.Generator().manual_seed(0))
    assert calls == {"text": 2, "images": 3}
    assert torch.equal(x0, x0b) and torch.equal(cond["time_ids"], condb["time_ids"])
    grid = again.grid_conditions(4)
    torch.testing.assert_close(grid["text_embeds"], ref["text_embeds"][[0, 1, 2, 0]])


def test_methods_on_real_data_need_image_caption_pairs(teacher, tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    parts = teacher.components
    with pytest.raises(FewstepError, match="trains on real images"):
        text_condition_source(parts, prompts=str(tmp_path / "p.txt"), data=None, need_images=True,
                              cache_dir=tmp_path, method="cd")
    with pytest.raises(FewstepError, match="trains on real images"):
        text_condition_source(parts, prompts=None, data=str(tmp_path / "p.txt"), need_images=True,
                              cache_dir=tmp_path, method="cd")
    with pytest.raises(FewstepError, match="needs prompts"):
        text_condition_source(parts, prompts=None, data=None, need_images=False, cache_dir=tmp_path, method="dmd2")
    src = text_condition_source(parts, prompts=str(tmp_path / "p.txt"), data=None, need_images=False,
                                cache_dir=tmp_path / "c", method="dmd2")
    x0, cond = src.sample(2, torch.Generator())
    assert x0 is None and cond["prompt_embeds"].shape[0] == 2
