"""benchmarks/jvp_backends.py on a teacher family (--arch) at tiny size on the CPU, and diffusers_train.py's
record of the JVP backend an sCM run used."""

from __future__ import annotations

import json

import torch
from support import load_benchmark


def test_arch_rows_have_errors_against_the_fp32_reference_and_the_kernel_paths(tmp_path, capsys):
    out = tmp_path / "jvp.json"
    n = torch.get_num_threads()
    try:
        load_benchmark("jvp_backends").main(["--arch", "sd3", "--size", "tiny", "--repeats", "1", "--dtype", "bf16",
                                             "--workdir", str(tmp_path), "--out", str(out)])
    finally:
        torch.set_num_threads(n)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "sd3" and row["dtype"] == "bfloat16" and row["batch"] == 2
    b = row["backends"]
    assert b["kernel"]["attention"] == {"reference": 2}  # both joint-attention layers through fewstep's attention
    assert b["kernel"]["rel_err_vs_fp32"] < 2e-2 and b["func"]["rel_err_vs_fp32"] < 2e-2
    assert b["fd"]["rel_err_vs_fp32"] > 10 * b["kernel"]["rel_err_vs_fp32"]  # differences in bf16: round-off
    assert row["auto_chooses"] == "kernel"
    assert "kernel attention" in capsys.readouterr().out


def test_diffusers_train_records_the_jvp_backend_of_an_scm_run(tmp_path):
    out = tmp_path / "r.json"
    n = torch.get_num_threads()
    try:
        assert load_benchmark("diffusers_train").main(["--cpu-smoke", "--method", "scm", "--out", str(out),
                                                       "--workdir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(n)
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["jvp"]["backend"] == "kernel" and r["jvp"]["attention"] == {"reference": 8}
                        for r in rows)
    assert all(r["jvp"]["dtype"] == "float32" for r in rows)  # --cpu-smoke runs without mixed precision
