"""Seconds per training iteration and peak memory of distillation on a diffusers teacher.

The teacher is a random-weight pipeline built from configs (no download): ``--size full`` keeps the real
UNet/transformer and VAE architectures (SDXL: the 2.6B-parameter UNet; text encoders of the real widths
but 2 layers, which only run once to fill the prompt cache), ``--size tiny`` is the test-size pipeline.
Each configuration runs `fewstep.distill` for --iters iterations on random image-caption pairs at
--resolution; the time of each iteration is taken from the trainer's progress callback (the first
--warmup iterations are left out) and the peak memory is CUDA's max_memory_allocated over the whole run
up to the last iteration (teacher loading included, the final sample grids not).

    python benchmarks/diffusers_train.py --arch sdxl --size full --resolution 1024 --iters 200 \\
        --sweep lora64,lora64+ckpt,full+ckpt --mixed-precision bf16 --batch-size 1 --out sdxl.json
    python benchmarks/diffusers_train.py --cpu-smoke --out /tmp/smoke.json    # tiny sizes on the CPU

Prints a table and writes JSON (one row per configuration).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def parse_variant(text: str) -> dict:
    """"lora64+ckpt+8bit" -> lora_rank 64, gradient checkpointing, 8-bit AdamW; "full" -> full fine-tuning."""
    out = {"lora_rank": 0, "gradient_checkpointing": False, "optimizer": "adamw", "name": text}
    for part in text.split("+"):
        if part.startswith("lora"):
            out["lora_rank"] = int(part[4:] or 64)
        elif part == "full":
            out["lora_rank"] = 0
        elif part == "ckpt":
            out["gradient_checkpointing"] = True
        elif part == "8bit":
            out["optimizer"] = "adamw8bit"
        else:
            raise SystemExit(f"unknown variant part {part!r} in {text!r} (lora<R>, full, ckpt, 8bit)")
    return out


def run_one(args, variant: dict, teacher: Path, data: Path, root: Path) -> dict:
    import fewstep

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    stamps: list[float] = []
    peaks: list[int] = []

    def progress(iteration, total, losses):
        if cuda:
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
        stamps.append(time.perf_counter())

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = fewstep.distill(method=args.method, teacher=str(teacher), data=str(data), out=str(root / variant["name"]),
                          iters=args.iters, batch_size=args.batch_size, lora_rank=variant["lora_rank"],
                          gradient_checkpointing=variant["gradient_checkpointing"], optimizer=variant["optimizer"],
                          mixed_precision=args.mixed_precision, resolution=args.resolution, eval=False,
                          sample_every=0, checkpoint_every=0, eval_steps=[1], log_every=max(1, args.iters // 10),
                          device="cuda" if cuda else "cpu", warmup=1, progress=progress)
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup:]
    return {"variant": variant["name"], "lora_rank": variant["lora_rank"],
            "gradient_checkpointing": variant["gradient_checkpointing"], "optimizer": variant["optimizer"],
            "iterations": res["iterations"], "s_per_iter": round(statistics.median(steps), 4) if steps else None,
            "s_per_iter_mean": round(statistics.fmean(steps), 4) if steps else None,
            "peak_gib": round(max(peaks) / 2**30, 2) if peaks else None, "run_seconds": round(total, 1),
            # sCM/rCM: the JVP backend the run used, its attention paths and precision (None for other methods)
            "jvp": ({"backend": res["jvp_backend"], "attention": res.get("jvp_attention"),
                     "dtype": res.get("jvp_dtype")} if "jvp_backend" in res else None)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from fewstep.teachers.random_pipelines import RANDOM_ARCHS

    p.add_argument("--arch", default="sdxl", choices=list(RANDOM_ARCHS))
    p.add_argument("--size", default="full", choices=["tiny", "full"])
    p.add_argument("--method", default="cd")
    p.add_argument("--sweep", default="lora64,lora64+ckpt,full+ckpt", help="comma-separated variants: lora<R>|full "
                   "[+ckpt][+8bit]")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=5, help="iterations left out of the timing")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--resolution", default=None, help="N or HxW (default: the pipeline's own)")
    p.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    p.add_argument("--save-dtype", default="bf16", choices=["fp32", "bf16"],
                   help="dtype of the random pipeline on disk (diffusers loads the UNet/VAE as float32, transformers "
                        "the text encoders as stored; the trainer decides the "
                        "precision frozen weights run in)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny pipeline on the CPU, a few iterations")
    p.add_argument("--workdir", default=None, help="where the pipeline and runs go (default: a temporary folder)")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.warmup, args.mixed_precision, args.save_dtype = 1, "no", "fp32"
        args.size, args.iters = "tiny", 4
        args.sweep = "lora4+ckpt,full"
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("CUDA is not available: run on a GPU, or pass --cpu-smoke for the tiny CPU run")
        return 1
    from fewstep.teachers.random_pipelines import save_caption_folder, save_random_pipeline

    variants = [parse_variant(v) for v in args.sweep.split(",") if v]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        dtype = torch.bfloat16 if args.save_dtype == "bf16" else torch.float32
        t0 = time.perf_counter()
        teacher = save_random_pipeline(args.arch, root / "teacher", size=args.size, dtype=dtype)
        build_s = time.perf_counter() - t0
        from fewstep.models.diffusers_pipeline import parse_resolution

        res = parse_resolution(args.resolution) or ((16, 16) if args.size == "tiny" else (1024, 1024))
        # the letter tokenizer spends one token per letter: tiny pipelines read 16 tokens, full ones 77
        words = "abcdefgh" if args.size == "tiny" else ["a red cube", "the blue sea", "two cats", "the dark night"]
        captions = [f"{words[i % len(words)]} {'xyz'[i % 3]}" for i in range(32)]
        data = save_caption_folder(root / "captions", captions=captions, size=res)
        rows = [run_one(args, v, teacher, data, root) for v in variants]
    device = (torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu_smoke
              else f"cpu ({platform.machine()}, {torch.get_num_threads()} thread(s))")
    result = {"benchmark": "diffusers_train", "arch": args.arch, "size": args.size, "method": args.method,
              "batch_size": args.batch_size, "resolution": list(res), "mixed_precision": args.mixed_precision,
              "saved_dtype": args.save_dtype, "iters": args.iters, "warmup": args.warmup, "device": device,
              "torch": torch.__version__, "pipeline_build_s": round(build_s, 1), "rows": rows}
    head = f"{'variant':<18} {'s/iter':>8} {'peak GiB':>9} {'iters':>6} {'run s':>7}"
    print(f"{args.method} on a random {args.size} {args.arch} at {res[0]}x{res[1]}, batch {args.batch_size}, "
          f"{args.mixed_precision}, {device}")
    print(head)
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        jvp = "" if r["jvp"] is None else (f"  jvp {r['jvp']['backend']} in {r['jvp']['dtype']}, attention "
                                           + ",".join(f"{k}:{v}" for k, v in sorted(r["jvp"]["attention"].items())))
        print(f"{r['variant']:<18} {r['s_per_iter']:>8.4f} {peak:>9} {r['iterations']:>6} {r['run_seconds']:>7.1f}"
              f"{jvp}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
