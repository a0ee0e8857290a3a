"""`fewstep distill`, `methods`, `export`, and sampling/evaluating students through the CLI."""

from __future__ import annotations

import json

import yaml
from support import assert_one_line_error as one_line_error
from support import cli_run as run
from support import last_json


def test_methods_lists_cd_and_lcm_with_options():
    r = run("methods", "--json")
    assert r.exit_code == 0, r.stderr
    rows = {m["name"]: m for m in last_json(r)["methods"]}
    assert {"cd", "lcm"} <= set(rows)
    assert rows["lcm"]["options"]["skip"] == 20 and rows["cd"]["options"]["solver"] == "heun"


def test_distill_sample_eval_export_round_trip(tmp_path):
    runs = tmp_path / "run"
    r = run("distill", "--method", "cd", "--teacher", "toy:checkerboard", "--iters", 4, "--batch-size", 16,
            "--out", runs, "--eval-num", 256, "--eval-steps", "1,2", "--opt", "num_timesteps=6", "--opt", "loss=l2",
            "--sample-every", 0, "--json")
    assert r.exit_code == 0, r.stderr
    res = last_json(r)
    assert res["iterations"] == 4 and res["run"] == str(runs)
    assert [row["steps"] for row in res["table"] if row["model"] == "student"] == [1, 2]
    cfg = yaml.safe_load((runs / "config.yaml").read_text())
    assert cfg["options"] == {"num_timesteps": 6, "loss": "l2"} and cfg["batch_size"] == 16

    # sample the student (its own 1-step sampler by default) and evaluate the samples
    s = tmp_path / "s.npz"
    r = run("sample", "--model", runs, "--steps", 1, "--num", 256, "--out", s, "--json")
    assert r.exit_code == 0, r.stderr
    out = last_json(r)
    assert out["solver"] == "fewstep" and out["steps"] == 1 and out["data"] == "toy:checkerboard"
    r = run("eval", "swd", "--samples", s, "--json")
    assert r.exit_code == 0, r.stderr
    assert last_json(r)["value"] > 0

    # export: a model directory that `sample --model` loads and gives the same samples
    exp = tmp_path / "exported"
    r = run("export", runs, "--format", "safetensors", "--out", exp, "--json")
    assert r.exit_code == 0, r.stderr
    assert {p.name for p in exp.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    assert "cd" in (exp / "README.md").read_text()
    s2 = tmp_path / "s2.npz"
    r = run("sample", "--model", exp, "--steps", 1, "--num", 256, "--out", s2)
    assert r.exit_code == 0, r.stderr
    import numpy as np

    assert np.array_equal(np.load(s)["samples"], np.load(s2)["samples"])
    # exporting again over it is refused; unknown formats too
    one_line_error(run("export", runs, "--out", exp), "already exists")
    one_line_error(run("export", runs, "--format", "onnx", "--out", tmp_path / "e2"), "onnx", "safetensors")


def test_distill_stop_and_resume_through_the_cli(tmp_path):
    runs = tmp_path / "run"
    r = run("distill", "--iters", 4, "--batch-size", 8, "--out", runs, "--stop-after", 2, "--no-eval", "--json")
    assert r.exit_code == 0, r.stderr
    assert last_json(r)["finished"] is False
    one_line_error(run("sample", "--model", runs, "--num", 4, "--out", tmp_path / "x.npz"), "--resume")
    r = run("distill", "--resume", "--out", runs, "--json")
    assert r.exit_code == 0, r.stderr
    res = last_json(r)
    assert res["finished"] is True and res["iterations"] == 4


def test_distill_bad_input_writes_nothing(tmp_path):
    for args, needles in (
        (["--iters", 0], ["--iters"]),
        (["--mixed-precision", "fp8"], ["fp8", "bf16"]),
        (["--opt", "solver=rk4"], ["rk4"]),
        (["--opt", "nope=1"], ["nope", "num_timesteps"]),
        (["--teacher", "toy:nope"], ["toy:nope"]),
        (["--eval-steps", "1,x"], ["--eval-steps"]),
    ):
        out = tmp_path / "run"
        one_line_error(run("distill", *args, "--out", out), *needles)
        assert not out.exists()
    one_line_error(run("distill", "--resume", "--out", tmp_path / "missing"), "nothing to resume")


def test_config_file_with_flag_override(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"teacher": "toy:moons", "iters": 50, "batch_size": 8, "eval": False,
                                      "sample_every": 0, "options": {"num_timesteps": 5}}))
    runs = tmp_path / "run"
    r = run("distill", "--config", recipe, "--iters", 2, "--opt", "skip=2", "--out", runs, "--json")
    assert r.exit_code == 0, r.stderr
    cfg = yaml.safe_load((runs / "config.yaml").read_text())
    assert cfg["teacher"] == "toy:moons" and cfg["iters"] == 2 and cfg["options"] == {"num_timesteps": 5, "skip": 2}


def test_lcm_student_samples_at_its_training_guidance_by_default(tmp_path):
    runs = tmp_path / "run"
    r = run("distill", "--method", "lcm", "--teacher", "digits", "--iters", 2, "--batch-size", 4, "--guidance", 2,
            "--out", runs, "--no-eval", "--sample-every", 0, "--json")
    assert r.exit_code == 0, r.stderr
    r = run("sample", "--model", runs, "--num", 4, "--out", tmp_path / "s", "--json")
    assert r.exit_code == 0, r.stderr
    assert last_json(r)["guidance"] == 2.0 and last_json(r)["steps"] == 1
    r = run("sample", "--model", runs, "--num", 4, "--guidance", 3, "--out", tmp_path / "s3", "--json")
    assert last_json(r)["guidance"] == 3.0


def test_ctrl_c_on_the_command_line_checkpoints_and_exits_130(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    runs = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fewstep.cli", "distill", "--iters", "100000", "--batch-size", "8",
                             "--log-every", "1", "--no-eval", "--out", str(runs), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((runs / "log.jsonl").is_file() and (runs / "log.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted at iteration" in err and "--resume" in err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["interrupted"] and (runs / "checkpoints" / f"step_{res['iterations']:08d}").is_dir()
