"""Quality rows: the default metric plus the data's secondary metric (mode / class coverage)."""


from fewstep.teachers import load_teacher
from fewstep.training.report import evaluate_model, table_text


def test_gaussians8_rows_report_mode_coverage_beside_swd():
    teacher = load_teacher("toy:gaussians8")
    row = evaluate_model(teacher, "toy:gaussians8", steps=20, solver="heun", num=2048)
    assert row["metric"] == "swd" and 0.08 < row["coverage"] <= 0.125  # every mode near 1/8 for the teacher
    one = evaluate_model(teacher, "toy:gaussians8", steps=1, solver="euler", num=2048)
    assert one["coverage"] < row["coverage"]  # one Euler step lands between the modes
    text = table_text([{"model": "teacher", "solver": "heun", "steps": 20, **row},
                       {"model": "teacher", "solver": "euler", "steps": 1, **one}])
    assert "coverage" in text.splitlines()[0] and f"{row['coverage']:.4f}" in text


def test_checkerboard_rows_have_no_secondary_metric():
    row = evaluate_model(load_teacher("toy:checkerboard"), "toy:checkerboard", steps=4, solver="heun", num=512)
    assert set(row) == {"metric", "value", "n_samples"}
    assert row["value"] > 0
