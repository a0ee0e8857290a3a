"""The CLI contract: --json result as the last stdout line, one-line errors with exit code 2,
nothing written on failure, nothing overwritten."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from support import assert_one_line_error, last_json
from support import cli_run as run


@pytest.mark.parametrize("cmd", [[], ["sample"], ["eval"], ["eval", "swd"], ["teacher"], ["teacher", "train"],
                                 ["distill"], ["export"]])
def test_help(cmd):
    r = run(*cmd, "--help")
    assert r.exit_code == 0
    assert "Usage" in r.stdout


def test_sample_2d_json_then_eval(tmp_path):
    out = tmp_path / "s.npz"
    r = run("sample", "--teacher", "toy:checkerboard", "--steps", 8, "--num", 512, "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    res = last_json(r)
    assert res["num"] == 512 and res["steps"] == 8 and res["data"] == "toy:checkerboard"
    with np.load(out) as z:
        assert z["samples"].shape == (512, 2)
    assert out.with_suffix(".png").is_file()

    r = run("eval", "swd", "--samples", out, "--json")
    assert r.exit_code == 0, r.stderr
    ev = last_json(r)
    assert ev["metric"] == "swd" and ev["ref"] == "toy:checkerboard"
    assert 0 < ev["value"] < 1.0

    # a deliberately wrong reference scores much worse
    r = run("eval", "swd", "--samples", out, "--ref", "toy:gaussians8", "--json")
    assert last_json(r)["value"] > 2 * ev["value"]


def test_sample_images_writes_pngs_and_grid(tmp_path):
    out = tmp_path / "digits"
    r = run("sample", "--teacher", "digits", "--steps", 4, "--num", 12, "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "grid.png" in pngs and len(pngs) == 13
    r = run("eval", "class-coverage", "--samples", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert last_json(r)["metric"] == "class-coverage"


def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "s.npz"
    out.write_bytes(b"precious")
    r = run("sample", "--teacher", "toy:moons", "--steps", 2, "--num", 8, "--out", out)
    assert_one_line_error(r, str(out), "already exists")
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--solver", "bogus"], ["'bogus'", "heun"]),
        (["--steps", "0"], ["--steps", "0"]),
        (["--num", "-3"], ["--num"]),
        (["--spacing", "weird"], ["'weird'", "karras"]),
        (["--guidance", "3"], ["--guidance", "unconditional"]),
    ],
)
def test_bad_sample_input_is_one_line_and_writes_nothing(tmp_path, args, needles):
    out = tmp_path / "s.npz"
    r = run("sample", "--teacher", "toy:checkerboard", "--num", 16, "--out", out, *args)
    assert_one_line_error(r, *needles)
    assert list(tmp_path.iterdir()) == []


def test_unknown_teacher_and_metric(tmp_path):
    r = run("sample", "--teacher", "nope", "--num", 4)
    assert_one_line_error(r, "'nope'", "toy:checkerboard")
    r = run("eval", "swd", "--samples", tmp_path / "missing.npz")
    assert_one_line_error(r, "missing.npz")


def test_label_out_of_range(tmp_path):
    r = run("sample", "--teacher", "digits", "--num", 4, "--label", 10, "--out", tmp_path / "d")
    assert_one_line_error(r, "--label", "0..9")
    assert not (tmp_path / "d").exists()


def test_teacher_train_and_sample_from_it(tmp_path):
    out = tmp_path / "teacher"
    r = run("teacher", "train", "--data", "toy:moons", "--iters", 20, "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert last_json(r)["iters"] == 20
    r = run("sample", "--teacher", out, "--steps", 2, "--num", 16, "--json")
    assert r.exit_code == 0, r.stderr
    # training again into the same directory is refused
    r = run("teacher", "train", "--data", "toy:moons", "--iters", 5, "--out", out)
    assert_one_line_error(r, "already exists")


def test_teacher_list_json():
    r = run("teacher", "list", "--json")
    names = [t["name"] for t in last_json(r)["teachers"]]
    assert {"toy:checkerboard", "digits"} <= set(names)


def test_distill_bad_method_is_a_clean_error(tmp_path):
    r = run("distill", "--method", "nope", "--out", tmp_path / "run")
    assert_one_line_error(r, "nope", "cd")
    assert not (tmp_path / "run").exists()


def test_console_script_json_is_last_stdout_line(tmp_path):
    """Through a real process: progress goes to stderr, stdout ends with the JSON object."""
    cmd = [sys.executable, "-m", "fewstep.cli", "sample", "--teacher", "toy:gaussians8", "--steps", "4",
           "--num", "64", "--out", str(tmp_path / "g.npz"), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["num"] == 64
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "already exists" in p.stderr


@pytest.mark.parametrize("args, needle", [(["sample", "--steps", "abc"], "'--steps'"),
                                          (["sample", "--bogus"], "--bogus"),
                                          (["eval", "swd"], "--samples"),
                                          (["nonsense"], "nonsense")])
def test_parse_errors_are_one_line_with_exit_code_2(args, needle):
    p = subprocess.run([sys.executable, "-m", "fewstep.cli", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert p.stdout == ""


def test_help_and_success_exit_zero_through_main():
    p = subprocess.run([sys.executable, "-m", "fewstep.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "sample" in p.stdout
