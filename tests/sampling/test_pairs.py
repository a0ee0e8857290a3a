"""Teacher pairs: per-sample noise as `generate` draws it, sharded atomic files, exact resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.sampling import generate, noise_for_seeds, sample_seeds
from fewstep.sampling.pairs import (
    MANIFEST,
    PairSet,
    generate_pairs,
    load_pairs,
    make_pairs,
    pairs_complete,
    shard_name,
)
from fewstep.teachers import load_teacher


@pytest.fixture(scope="module")
def cb():
    return load_teacher("toy:checkerboard")


@pytest.fixture(scope="module")
def digits():
    return load_teacher("digits")


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_pairs_do_not_depend_on_the_batch_size_and_start_from_generates_noise(cb):
    a = make_pairs(cb, 11, steps=3, seed=4, batch_size=11)
    b = make_pairs(cb, 11, steps=3, seed=4, batch_size=4)
    assert torch.equal(a.noise, b.noise) and a.cond is None and len(a) == 11
    torch.testing.assert_close(a.x, b.x, rtol=1e-6, atol=1e-6)
    # pair i's noise is exactly the initial noise of sample i of generate(), and x is generate's sample
    assert torch.equal(a.noise, noise_for_seeds(sample_seeds(4, 0, 11), (2,)))
    x, _ = generate(cb, 11, steps=3, solver="heun", seed=4, batch_size=11)
    assert torch.equal(a.x, x)
    c = make_pairs(cb, 11, steps=3, seed=5, batch_size=11)
    assert float((c.noise - a.noise).abs().min()) > 0
    assert a.manifest["steps"] == 3 and a.manifest["solver"] == "heun" and a.manifest["num"] == 11


def test_class_conditional_pairs_get_cyclic_or_given_labels_and_guidance(digits):
    p = make_pairs(digits, 12, steps=2, solver="euler", batch_size=5)
    assert p.cond.tolist() == [i % 10 for i in range(12)]
    x, labels = generate(digits, 12, steps=2, solver="euler", batch_size=12)
    torch.testing.assert_close(p.x, x, rtol=1e-5, atol=1e-5)
    given = torch.full((12,), 3)
    q = make_pairs(digits, 12, steps=2, solver="euler", labels=given, guidance=2.0)
    xq, _ = generate(digits, 12, steps=2, solver="euler", labels=given, guidance=2.0)
    assert q.cond.tolist() == [3] * 12 and q.manifest["guidance"] == 2.0
    torch.testing.assert_close(q.x, xq, rtol=1e-5, atol=1e-5)
    assert torch.equal(q.noise, p.noise)  # the noise depends on the seed only


def test_random_batches_follow_the_generator(cb):
    p = PairSet(torch.arange(10.0)[:, None], torch.arange(10.0)[:, None] * 2, torch.arange(10), {})
    z1, x1, c1 = p.sample(6, torch.Generator().manual_seed(3))
    z2, x2, c2 = p.sample(6, torch.Generator().manual_seed(3))
    assert torch.equal(z1, z2) and torch.equal(x1, 2 * z1) and torch.equal(c1.float(), z1[:, 0])
    with pytest.raises(FewstepError, match="disagree"):
        PairSet(torch.zeros(3, 2), torch.zeros(4, 2))


def test_on_disk_pairs_equal_the_in_memory_ones(tmp_path, cb):
    res = generate_pairs(cb, tmp_path / "p", 10, steps=3, seed=1, shard_size=4, batch_size=4, teacher_spec="toy")
    assert res["complete"] and res["shards_made"] == [0, 1, 2] and res["pairs_made"] == 10
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [MANIFEST] + [shard_name(j) for j in range(3)]
    m = json.loads((tmp_path / "p" / MANIFEST).read_text())
    assert (m["teacher"], m["num"], m["shard_size"], m["num_shards"], m["steps"], m["data_shape"]) == (
        "toy", 10, 4, 3, 3, [2])
    loaded = load_pairs(tmp_path / "p")
    ref = make_pairs(cb, 10, steps=3, seed=1, batch_size=4)  # same batches: bit-identical
    assert torch.equal(loaded.noise, ref.noise) and torch.equal(loaded.x, ref.x) and loaded.cond is None
    assert loaded.manifest["num_shards"] == 3


def test_conditional_shards_hold_the_labels(tmp_path, digits):
    generate_pairs(digits, tmp_path / "d", 7, steps=1, solver="euler", shard_size=3, batch_size=8)
    p = load_pairs(tmp_path / "d")
    assert p.cond.tolist() == [i % 10 for i in range(7)] and p.x.shape == (7, 1, 8, 8)


def test_an_interrupted_generation_resumes_to_the_same_files(tmp_path, cb):
    kw = dict(steps=3, seed=2, shard_size=4, batch_size=3, teacher_spec="toy:checkerboard")
    generate_pairs(cb, tmp_path / "full", 18, **kw)

    made = [0]

    def dies_after_two_shards(n):  # the process is killed once shards 0 and 1 are on disk
        made[0] += n
        if made[0] > 8:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        generate_pairs(cb, part, 18, **kw, progress=dies_after_two_shards)
    assert sorted(p.name for p in part.glob("shard_*")) == [shard_name(0), shard_name(1)]
    assert not pairs_complete(part)
    # a kill during a write leaves a temporary file; a cut copy leaves a partial file under a shard's name
    (part / f".{shard_name(2)}.x1y2.tmp").write_bytes(b"half a shard")
    (part / shard_name(3)).write_bytes((tmp_path / "full" / shard_name(3)).read_bytes()[:100])
    with pytest.raises(FewstepError, match="incomplete|not shard"):
        load_pairs(part)
    res = generate_pairs(cb, part, 18, **kw)
    assert res["shards_made"] == [2, 3, 4] and res["complete"]
    assert files(part) == files(tmp_path / "full")  # byte for byte; no temporary file left
    assert generate_pairs(cb, part, 18, **kw)["shards_made"] == []  # nothing left to do


def test_different_arguments_on_an_existing_set_are_refused(tmp_path, cb):
    out = tmp_path / "p"
    generate_pairs(cb, out, 6, steps=2, shard_size=4)
    before = files(out)
    with pytest.raises(FewstepError, match=r"other arguments: steps=2 \(asked: 3\)"):
        generate_pairs(cb, out, 6, steps=3, shard_size=4)
    with pytest.raises(FewstepError, match="num=6"):
        generate_pairs(cb, out, 8, steps=2, shard_size=4)
    with pytest.raises(FewstepError, match="teacher_sha256"):
        generate_pairs(load_teacher("toy:moons"), out, 6, steps=2, shard_size=4)
    assert files(out) == before
    # the display name of the teacher may differ
    assert generate_pairs(cb, out, 6, steps=2, shard_size=4, teacher_spec="another name")["shards_made"] == []
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FewstepError, match="not a pair set"):
        generate_pairs(cb, other, 6, steps=2)
    for bad, needle in (({"solver": "fewstep"}, "unknown pair solver"), ({"steps": 0}, "steps >= 1"),
                        ({"shard_size": 0}, "shard_size"), ({"worker": 2, "workers": 2}, "worker < workers")):
        with pytest.raises(FewstepError, match=needle):
            generate_pairs(cb, tmp_path / "new", 6, **{"steps": 2, **bad})


def test_load_refuses_missing_shards_foreign_shards_and_non_sets(tmp_path, cb):
    generate_pairs(cb, tmp_path / "a", 9, steps=2, shard_size=4)
    generate_pairs(cb, tmp_path / "b", 9, steps=2, seed=7, shard_size=4)
    (tmp_path / "a" / shard_name(1)).unlink()
    with pytest.raises(FewstepError, match=r"incomplete: 1 of 3 shards missing \(shard_00001.safetensors\)"):
        load_pairs(tmp_path / "a")
    (tmp_path / "a" / shard_name(1)).write_bytes((tmp_path / "b" / shard_name(1)).read_bytes())
    with pytest.raises(FewstepError, match="not shard 1 of this pair set"):
        load_pairs(tmp_path / "a")
    with pytest.raises(FewstepError, match="not a pair set"):
        load_pairs(tmp_path)


def test_workers_make_disjoint_shards_of_one_set(tmp_path, cb):
    kw = dict(steps=2, shard_size=3, batch_size=3)
    generate_pairs(cb, tmp_path / "one", 14, **kw)
    r0 = generate_pairs(cb, tmp_path / "split", 14, **kw, worker=0, workers=2)
    assert r0["shards_made"] == [0, 2, 4] and not r0["complete"]
    with pytest.raises(FewstepError, match="incomplete"):
        load_pairs(tmp_path / "split")
    r1 = generate_pairs(cb, tmp_path / "split", 14, **kw, worker=1, workers=2)
    assert r1["shards_made"] == [1, 3] and r1["complete"]
    assert files(tmp_path / "split") == files(tmp_path / "one")
