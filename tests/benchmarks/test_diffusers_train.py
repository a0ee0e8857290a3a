"""benchmarks/diffusers_train.py runs end to end on the CPU at tiny size (--cpu-smoke); the real run needs CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from support import load_benchmark


def test_variants_parse():
    bench = load_benchmark("diffusers_train")
    assert bench.parse_variant("lora64+ckpt+8bit") == {"lora_rank": 64, "gradient_checkpointing": True,
                                                       "optimizer": "adamw8bit", "name": "lora64+ckpt+8bit"}
    assert bench.parse_variant("full")["lora_rank"] == 0
    with pytest.raises(SystemExit):
        bench.parse_variant("lora8+fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_without_cuda_says_so_in_one_line(capsys, tmp_path):
    out = tmp_path / "r.json"
    assert load_benchmark("diffusers_train").main(["--out", str(out)]) == 1
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "CUDA is not available" in printed[0]
    assert not out.exists()


def test_cpu_smoke_writes_a_table_and_json(capsys, tmp_path):
    n = torch.get_num_threads()
    out = tmp_path / "r.json"
    try:
        bench = load_benchmark("diffusers_train")
        assert bench.main(["--cpu-smoke", "--out", str(out), "--workdir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads(out.read_text())
    assert res["arch"] == "sdxl" and res["size"] == "tiny" and res["resolution"] == [16, 16]
    assert [r["variant"] for r in res["rows"]] == ["lora4+ckpt", "full"]
    assert all(r["iterations"] == 4 and r["s_per_iter"] > 0 and r["peak_gib"] is None for r in res["rows"])
    printed = capsys.readouterr().out
    assert "s/iter" in printed and "lora4+ckpt" in printed
