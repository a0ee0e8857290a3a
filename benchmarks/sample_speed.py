"""Few-step text-to-image inference: fewstep's sampler engine against the stock diffusers pipeline, on one
random-weight pipeline (no download) shared by both.

    python benchmarks/sample_speed.py --arch sdxl --size full --steps 1 4 --out sample_speed.json   # a GPU, 1024 px
    python benchmarks/sample_speed.py --size tiny --out /tmp/sample_speed.json                       # the CPU, 16 px

For each step count: per-image latency at batch 1 (prompt encoding, the network calls, VAE decode, images on the
host) and throughput at batch 16, for
  stock     the pipeline's own __call__ (num_inference_steps=STEPS, guidance_scale 1: no CFG, output_type "pt", the
            images then copied to the host);
  fewstep   `fewstep.sample(denoiser, steps=STEPS, solver="euler")` on the same pipeline: the same number of
            network calls and one VAE decode, images returned on the CPU as float32;
  fast      the same with --compile, --channels-last and, on CUDA, --cuda-graphs (their one-off compilation and
            capture happen in the warm-up calls and are reported apart).
Every timed call gets prompts it has not seen (so fewstep's prompt cache does not help it), the same for both.
Rows run in this order: stock, fewstep, fast (the fast row compiles the shared network in place, so it is last).
Ratios are fewstep time / stock time for latency (lower is better) and fewstep / stock images per second for
throughput (higher is better). Times are medians over --repeats calls after --warmup calls. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

WORDS = ["a red cube", "the blue sea", "two cats", "the dark night", "a tall tree", "an old boat", "green hills",
         "a small dog"]


class Prompts:
    """Prompts never given before: word pairs, numbered (tiny pipelines' letter tokenizer reads 16 letters)."""

    def __init__(self, tiny: bool):
        self.tiny, self.count = tiny, itertools.count()

    def take(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            i = next(self.count)
            if self.tiny:  # letters only, distinct for the first 26^3 calls
                out.append("".join("abcdefghijklmnopqrstuvwxyz"[(i // 26 ** k) % 26] for k in range(3)) + " cat")
            else:
                out.append(f"{WORDS[i % len(WORDS)]} number {i}")
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, repeats: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(median seconds of `repeats` calls after `warmup` calls, seconds of the warm-up calls)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), warm


def stock_call(pipe, prompts: list[str], steps: int, resolution: tuple[int, int]):
    kw = {"num_inference_steps": steps, "guidance_scale": 1.0, "height": resolution[0], "width": resolution[1],
          "output_type": "pt", "generator": [torch.Generator().manual_seed(i) for i in range(len(prompts))]}
    return pipe(prompt=prompts, **kw).images.cpu()  # on the host, as fewstep returns them


def fewstep_call(den, prompts: list[str], steps: int, fast: dict):
    import fewstep

    return fewstep.sample(den, num=len(prompts), steps=steps, solver="euler", guidance=1.0, prompts=prompts,
                          batch_size=len(prompts), **fast)["_samples"]


def measure(name: str, call, prompts: Prompts, batch: int, args, device) -> dict:
    lat, warm1 = _median_seconds(lambda: call(prompts.take(1)), args.repeats, args.warmup, device)
    per_batch, warm16 = _median_seconds(lambda: call(prompts.take(batch)), max(3, args.repeats // 2), args.warmup,
                                        device)
    return {"variant": name, "latency_s": lat, "throughput_img_s": batch / per_batch, "batch": batch,
            "warmup_s": round(warm1 + warm16, 2)}


def main(argv=None) -> int:
    from fewstep.teachers.random_pipelines import RANDOM_ARCHS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sdxl", choices=[a for a in RANDOM_ARCHS if a != "sd2-v"])
    p.add_argument("--size", default="tiny", choices=["tiny", "full"])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    p.add_argument("--batch", type=int, default=16, help="batch size of the throughput measurement")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--no-fast", action="store_true", help="leave out the fast row (no compilation)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fewstep.devices import dtype_name, resolve_device, resolve_dtype
    from fewstep.models.diffusers_pipeline import denoiser_from_pipeline
    from fewstep.teachers.random_pipelines import build_random_pipeline

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, diffusers=True)
    t0 = time.perf_counter()
    pipe = build_random_pipeline(args.arch, size=args.size, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - t0
    den = denoiser_from_pipeline(pipe, f"random-{args.size}-{args.arch}").to(device)
    resolution = tuple(den.meta["resolution"])
    prompts = Prompts(args.size == "tiny")
    fast = {"compile": True, "channels_last": True, "cuda_graphs": device.type == "cuda"}
    rows = []
    for steps in args.steps:
        rows.append({"steps": steps, **measure("stock", lambda ps, s=steps: stock_call(pipe, ps, s, resolution),
                                               prompts, args.batch, args, device)})
        rows.append({"steps": steps, **measure("fewstep", lambda ps, s=steps: fewstep_call(den, ps, s, {}),
                                               prompts, args.batch, args, device)})
    if not args.no_fast:
        for steps in args.steps:
            rows.append({"steps": steps, **measure("fast", lambda ps, s=steps: fewstep_call(den, ps, s, fast),
                                                   prompts, args.batch, args, device)})
    for r in rows:
        stock = next(s for s in rows if s["steps"] == r["steps"] and s["variant"] == "stock")
        r["latency_ratio"] = r["latency_s"] / stock["latency_s"]
        r["throughput_ratio"] = r["throughput_img_s"] / stock["throughput_img_s"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.machine()}, {torch.get_num_threads()} thread(s))"
    print(f"{args.arch} ({args.size}, random weights) at {resolution[0]}x{resolution[1]} in {dtype_name(dtype)} on "
          f"{name}; latency at batch 1, throughput at batch {args.batch}")
    print(f"{'steps':>5} {'variant':<8} {'latency ms':>11} {'x stock':>8} {'img/s':>9} {'x stock':>8} "
          f"{'warm-up s':>10}")
    for r in sorted(rows, key=lambda r: (r["steps"], ["stock", "fewstep", "fast"].index(r["variant"]))):
        print(f"{r['steps']:>5} {r['variant']:<8} {1e3 * r['latency_s']:>11.2f} {r['latency_ratio']:>8.2f} "
              f"{r['throughput_img_s']:>9.2f} {r['throughput_ratio']:>8.2f} {r['warmup_s']:>10.2f}")
    result = {"benchmark": "sample_speed", "arch": args.arch, "size": args.size, "resolution": list(resolution),
              "dtype": dtype_name(dtype), "device": name, "torch": torch.__version__, "batch": args.batch,
              "repeats": args.repeats, "warmup": args.warmup, "pipeline_build_s": round(build_s, 1),
              "fast_options": fast, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
