"""benchmarks/sample_speed.py (fewstep vs stock diffusers) runs end to end on the CPU at tiny size."""

from __future__ import annotations

import json

import torch
from support import load_benchmark


def test_prompts_are_never_repeated():
    bench = load_benchmark("sample_speed")
    for tiny in (True, False):
        p = bench.Prompts(tiny)
        seen = p.take(5) + p.take(300)
        assert len(set(seen)) == len(seen)
        if tiny:  # the tiny pipelines' tokenizer reads letters
            assert all(set(s) <= set("abcdefghijklmnopqrstuvwxyz ") for s in seen)


def test_tiny_cpu_run_prints_a_table_and_writes_json(capsys, tmp_path):
    out = tmp_path / "s.json"
    threads = torch.get_num_threads()
    try:
        assert load_benchmark("sample_speed").main(["--size", "tiny", "--steps", "1", "--batch", "3", "--repeats",
                                                    "1", "--warmup", "1", "--no-fast", "--threads", "1",
                                                    "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert res["benchmark"] == "sample_speed" and res["resolution"] == [16, 16] and res["dtype"] == "fp32"
    assert [(r["variant"], r["steps"]) for r in res["rows"]] == [("stock", 1), ("fewstep", 1)]
    stock, ours = res["rows"]
    assert stock["latency_ratio"] == 1.0 and stock["throughput_ratio"] == 1.0
    assert ours["latency_s"] > 0 and ours["throughput_img_s"] > 0
    assert abs(ours["latency_ratio"] - ours["latency_s"] / stock["latency_s"]) < 1e-9
    table = capsys.readouterr().out
    assert "x stock" in table and "fewstep" in table and "stock" in table


def test_fewstep_and_stock_make_the_same_images():
    """The benchmark compares like with like: at the same seed, steps and prompt the fewstep call makes the stock
    pipeline's image (Euler on the pipeline's own schedule is not asked for here, so the sampler differs; the
    prompt encoding and the VAE decode are the same: check them through one network call of each)."""
    from fewstep.models.diffusers_pipeline import denoiser_from_pipeline
    from fewstep.teachers.random_pipelines import build_random_pipeline

    bench = load_benchmark("sample_speed")
    pipe = build_random_pipeline("sdxl", size="tiny")
    pipe.set_progress_bar_config(disable=True)
    den = denoiser_from_pipeline(pipe, "random")
    ours = bench.fewstep_call(den, ["abc cat", "xyz cat"], 1, {})
    stock = bench.stock_call(pipe, ["abc cat", "xyz cat"], 1, (16, 16))
    assert ours.shape == stock.shape == (2, 3, 16, 16)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
