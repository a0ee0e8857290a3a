"""`fewstep pairs` and `fewstep distill --method reflow` from the command line: JSON result, resume, errors."""

from __future__ import annotations

import torch
from support import assert_one_line_error as one_line_error
from support import cli_run as run
from support import last_json

from fewstep.sampling.pairs import load_pairs, shard_name


def test_pairs_json_resume_and_workers(tmp_path):
    out = tmp_path / "pairs"
    args = ["pairs", "--teacher", "toy:checkerboard", "--num", 10, "--steps", 3, "--shard-size", 4, "--out", out]
    r = run(*args, "--worker", 1, "--workers", 2, "--json")
    assert r.exit_code == 0, r.stderr
    res = last_json(r)
    assert res["shards_made"] == [1] and not res["complete"] and res["pairs_made"] == 4
    r = run(*args, "--json")  # the same set, all workers' shards: only the missing ones are made
    res = last_json(r)
    assert res["shards_made"] == [0, 2] and res["complete"] and res["data"] == "toy:checkerboard"
    assert res["pairs_per_second"] > 0
    p = load_pairs(out)
    assert len(p) == 10 and p.manifest["teacher"] == "toy:checkerboard" and p.manifest["steps"] == 3
    assert last_json(run(*args, "--json"))["shards_made"] == []
    r = run(*args)  # a table for people
    assert r.exit_code == 0 and "shards_present" in r.stdout
    import fewstep  # the same call from Python: fewstep.pairs

    res = fewstep.pairs("toy:checkerboard", tmp_path / "api", num=10, steps=3, shard_size=4)
    q = load_pairs(tmp_path / "api")
    assert res["complete"] and torch.equal(q.noise, p.noise) and torch.equal(q.x, p.x)


def test_pairs_errors_are_one_line(tmp_path):
    out = tmp_path / "pairs"
    base = ["pairs", "--teacher", "toy:checkerboard", "--num", 6, "--steps", 2, "--out", out]
    assert run(*base, "--json").exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    one_line_error(run(*base[:-4], "--steps", 3, "--out", out), "other arguments", "steps=2 (asked: 3)")
    one_line_error(run(*base, "--solver", "fewstep"), "unknown pair solver 'fewstep'")
    one_line_error(run(*base, "--worker", 3, "--workers", 2), "--worker")
    one_line_error(run("pairs", "--teacher", "nope", "--num", 4, "--out", tmp_path / "x"), "unknown teacher 'nope'")
    one_line_error(run(*base, "--guidance", 2), "--guidance needs a conditional model")
    one_line_error(run("pairs", "--teacher", "toy:checkerboard", "--num", 0, "--out", tmp_path / "y"), "--num")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    one_line_error(run("pairs", "--teacher", "toy:checkerboard", "--num", 4, "--out", tmp_path / "busy"),
                   "not a pair set")
    assert sorted(p.name for p in out.iterdir()) == before == ["manifest.json", shard_name(0)]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_distill_reflow_from_the_cli(tmp_path):
    run_dir = tmp_path / "run"
    r = run("distill", "--method", "reflow", "--iters", 4, "--batch-size", 8, "--no-eval", "--sample-every", 0,
            "--out", run_dir, "--opt", "pair_num=32", "--opt", "pair_steps=2", "--opt", "straightness_num=16",
            "--opt", "straightness_steps=2", "--opt", "distill_1step=true", "--json")
    assert r.exit_code == 0, r.stderr
    res = last_json(r)
    assert res["finished"] and [s["after"] for s in res["straightness"]] == ["teacher", "round 1",
                                                                              "1-step distillation"]
    assert (run_dir / "pairs" / "round_1" / "manifest.json").is_file()
    r = run("distill", "--method", "reflow", "--out", tmp_path / "bad", "--opt", "rounds=0")
    one_line_error(r, "rounds must be an integer >= 1")


def test_a_killed_pairs_process_resumes_to_the_same_files(tmp_path):
    """SIGKILL `fewstep pairs` once a few shards are on disk (possibly mid-write), then run it again: the set is
    byte for byte the one an uninterrupted run makes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fewstep.sampling.pairs import generate_pairs
    from fewstep.teachers import load_teacher

    out = tmp_path / "killed"
    args = ["pairs", "--teacher", "toy:checkerboard", "--num", 4096, "--steps", 20, "--shard-size", 256,
            "--batch-size", 128, "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fewstep.cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / shard_name(2)).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    present = sorted(p.name for p in out.glob("shard_*"))
    assert shard_name(2) in present and len(present) < 16, present  # killed part-way
    generate_pairs(load_teacher("toy:checkerboard"), tmp_path / "full", 4096, steps=20, shard_size=256,
                   batch_size=128, teacher_spec="toy:checkerboard")
    r = run(*args, "--json")
    assert r.exit_code == 0 and last_json(r)["complete"]
    assert set(last_json(r)["shards_made"]).isdisjoint({0, 1, 2})
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert files == {p.name: p.read_bytes() for p in sorted((tmp_path / "full").iterdir())}
