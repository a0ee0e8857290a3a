"""benchmarks/attention_jvp.py runs end to end on tiny CPU sizes (--cpu-smoke); the real run needs CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from support import load_benchmark

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_without_cuda_says_so_in_one_line(capsys, tmp_path):
    out = tmp_path / "r.json"
    assert load_benchmark("attention_jvp").main(["--out", str(out)]) == 1
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "CUDA is not available" in printed[0]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run")
def test_cpu_smoke_writes_table_and_json(capsys, tmp_path):
    out = tmp_path / "r.json"
    rc = load_benchmark("attention_jvp").main(["--cpu-smoke", "--seq", "48", "--head-dims", "16", "--heads", "2",
                                "--repeat", "1", "--dtype", "float32", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["cpu_smoke"] is True and result["dtype"] == "float32"
    methods = {r["method"] for r in result["rows"]}
    assert methods == {"func_jvp_math", "finite_diff", "reference_jvp", "flash_forward"}
    for r in result["rows"]:
        assert r["status"] == "ok" and r["ms"] > 0 and (r["L"], r["D"]) == (48, 16)
        # every tangent agrees with the reference (finite differences up to their O(h^2) step error)
        limit = {"func_jvp_math": 1e-5, "reference_jvp": 1e-7, "finite_diff": 1e-3, "flash_forward": None}
        if limit[r["method"]] is None:
            assert r["max_err"] is None
        else:
            assert r["max_err"] < limit[r["method"]], r
    assert "| 48 | 16 | reference_jvp |" in capsys.readouterr().out
