"""`benchmarks/diffusers_train.py --breakdown` on a tiny pipeline on the CPU, and `benchmarks/speed.py`'s trainer part
(both through benchmarks/call_replay.py): the structure of the table and JSON, no timing asserted."""

from __future__ import annotations

import json

import torch
from support import load_benchmark


def test_breakdown_on_a_tiny_pipeline_writes_a_table_and_json(capsys, tmp_path):
    n = torch.get_num_threads()
    out = tmp_path / "b.json"
    try:
        bench = load_benchmark("diffusers_train")
        assert bench.main(["--breakdown", "--arch", "sdxl", "--size", "tiny", "--device", "cpu", "--threads", "1",
                           "--methods", "cd,dmd2", "--repeats", "1", "--warmup", "0", "--out", str(out),
                           "--workdir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads(out.read_text())
    assert res["benchmark"] == "diffusers_train_breakdown" and res["size"] == "tiny"
    assert res["methods"] == ["cd", "dmd2"]
    assert res["mixed_precision"] == "no" and res["device"].startswith("cpu")
    cd, dmd2 = res["rows"]
    assert cd["method"] == "cd" and cd["variant"] == "lora4+ckpt" and cd["cycle"] == 1
    # CD: the teacher's ODE step (Heun: 2 calls, or 1 to clean data), the EMA target and the trained student
    assert cd["calls"]["student"] == 1 and cd["calls"]["target"] == 1 and cd["calls"]["teacher"] in (1, 2)
    # DMD2: 5 critic iterations per generator one, measured over a whole cycle; the teacher runs in the generator's
    assert dmd2["cycle"] == 5 and dmd2["calls"]["teacher"] == 1 and dmd2["calls"]["fake_score"] == 6
    for r in res["rows"]:
        assert r["step_ms"] > 0 and r["network_calls_ms"] > 0 and r["ratio"] > 0
        assert set(r["rows"]) == set(r["calls"]) and r["timed_cycles"] == 1
    printed = capsys.readouterr().out
    assert "calls ms" in printed and "ratio" in printed and "per cycle of 5" in printed


def test_speed_trainer_part_counts_the_jvp_as_one_call():
    bench = load_benchmark("speed")
    r = bench.trainer_overhead("scm", "toy:checkerboard", batch=16, repeats=1)
    assert r["calls"]["jvp"] == 1 and r["calls"]["student"] == 1 and r["calls"]["teacher"] == 1
    assert r["ratio"] > 0 and r["network_calls_ms"] > 0
