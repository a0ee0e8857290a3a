"""benchmarks/quality.py runs a cell end to end and reports mode coverage beside the metric."""

import json

from support import load_benchmark


def test_quality_cell_reports_coverage_and_ratios(tmp_path, capsys):
    bench = load_benchmark("quality")
    out = tmp_path / "q.json"
    bench.main(["--methods", "dmd2:update_ratio=1", "--teachers", "toy:gaussians8", "--iters", "2", "--eval-num",
                "256", "--out", str(out)])
    cell = json.loads(out.read_text())["cells"][0]
    assert cell["method"] == "dmd2:update_ratio=1" and cell["options"] == {"update_ratio": 1}
    assert cell["iterations"] == 2 and cell["n_samples"] == 256 and cell["metric"] == "swd"
    # a one-step generator is scored at 1 step only (the method's default table)
    assert set(cell["coverage"]) == {"teacher (best) 50", "teacher 1", "student 1"}
    assert cell["student"]["2"] is None and cell["ratio_2step_vs_teacher_2step"] is None
    assert 0 <= cell["coverage"]["student 1"] <= 1
    assert cell["ratio_vs_teacher_best"]["1"] == cell["student"]["1"] / cell["teacher_best"]  # JSON keys
    text = capsys.readouterr().out
    assert "S1 min-mode" in text and f"{cell['coverage']['student 1']:.4f}" in text
    row = text.splitlines()[-2].split(")", 1)[1].split()  # after the teacher's 2-step "(solver)"
    assert row[:3] == [f"{cell['student']['1']:.4f}", "-", "-"]  # student 1, 2, 4
