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

--breakdown: where an iteration's time goes, per method (`benchmarks/call_replay.py`): the median iteration time
against the sum of the network calls it makes, each replayed alone (forward under no_grad for frozen calls,
forward + backward for trained ones, a JVP as a JVP), with the calls per role:

    python benchmarks/diffusers_train.py --breakdown --arch sdxl --size full --resolution 1024 \
        --methods cd,lcm,dmd2,tdm,scm --sweep lora64+ckpt --mixed-precision bf16 --out breakdown.json
    python benchmarks/diffusers_train.py --breakdown --arch sdxl --size tiny --threads 1 --out /tmp/b.json  # CPU

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from call_replay import trainer_breakdown  # noqa: E402  (benchmarks/call_replay.py, shared with speed.py)


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

    cuda = torch.cuda.is_available() and not args.cpu_smoke and args.device != "cpu"
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


def breakdown_one(args, method: str, variant: dict, teacher: Path, data: Path, root: Path, device: str) -> dict:
    """One method's iteration against its network calls replayed alone (`call_replay.trainer_breakdown`), on a
    Trainer built as `fewstep.distill` builds it (same flags as `run_one`; no logging, samples or checkpoints)."""
    from fewstep.training.run import plan_run
    from fewstep.training.trainer import Trainer

    values = {"method": method, "teacher": str(teacher), "data": str(data),
              "out": str(root / f"breakdown-{method}-{variant['name']}"), "iters": 100_000,
              "batch_size": args.batch_size, "lora_rank": variant["lora_rank"],
              "gradient_checkpointing": variant["gradient_checkpointing"], "optimizer": variant["optimizer"],
              "mixed_precision": args.mixed_precision, "resolution": args.resolution, "eval": False,
              "sample_every": 0, "checkpoint_every": 0, "log_every": 0, "device": device, "warmup": 1}
    if args.guidance is not None:
        values["guidance"] = args.guidance
    plan = plan_run(values, explicit=set(values))
    trainer = Trainer(plan.config, teacher=plan.teacher, method=plan.method, reloadable_teacher=True)
    res = trainer_breakdown(trainer, repeats=args.repeats, warmup=args.warmup, record=args.record)
    return {"method": method, "variant": variant["name"], "guidance": plan.config.guidance,
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}}


def print_breakdown(result: dict) -> None:
    print(f"trainer breakdown: one iteration / the sum of its network calls replayed alone; random {result['size']} "
          f"{result['arch']} at {result['resolution'][0]}x{result['resolution'][1]}, batch {result['batch_size']}, "
          f"{result['mixed_precision']}, {result['device']}")
    print(f"{'method':<7} {'arch':<5} {'size':<5} {'variant':<12} {'step ms':>10} {'calls ms':>10} {'ratio':>6}  "
          "calls per role (batch rows) per iteration, or per cycle of N iterations")
    for r in result["rows"]:
        calls = ", ".join(f"{k} {v} ({r['rows'][k]})" for k, v in r["calls"].items())
        if r["cycle"] > 1:
            calls += f" per cycle of {r['cycle']}"
        print(f"{r['method']:<7} {result['arch']:<5} {result['size']:<5} {r['variant']:<12} {r['step_ms']:>10.1f} "
              f"{r['network_calls_ms']:>10.1f} {r['ratio']:>6.2f}  {calls}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from fewstep.teachers.random_pipelines import RANDOM_ARCHS

    p.add_argument("--arch", default="sdxl", choices=list(RANDOM_ARCHS))
    p.add_argument("--size", default="full", choices=["tiny", "full"])
    p.add_argument("--method", default="cd")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: --method)")
    p.add_argument("--sweep", default=None, help="comma-separated variants: lora<R>|full [+ckpt][+8bit] (default: "
                   "lora64,lora64+ckpt,full+ckpt; with --breakdown lora64+ckpt at full size, lora4+ckpt at tiny)")
    p.add_argument("--breakdown", action="store_true", help="per method: iteration time / its network calls "
                   "replayed alone (see the module docstring)")
    p.add_argument("--repeats", type=int, default=5, help="--breakdown: timed iterations and replays (medians)")
    p.add_argument("--record", type=int, default=1, help="--breakdown: iterations whose calls are replayed")
    p.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default: the run's default)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"],
                   help="default: cuda when available (tiny sizes may run on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=None, help="iterations left out of the timing (default 5; "
                   "--breakdown: 2)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--resolution", default=None, help="N or HxW (default: the pipeline's own)")
    p.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"],
                   help="default: bf16 on CUDA, no on the CPU")
    p.add_argument("--save-dtype", default=None, choices=["fp32", "bf16"],
                   help="dtype of the random pipeline on disk (diffusers loads the UNet/VAE as float32, transformers "
                        "the text encoders as stored; the trainer decides the "
                        "precision frozen weights run in; default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny pipeline on the CPU, a few iterations")
    p.add_argument("--workdir", default=None, help="where the pipeline and runs go (default: a temporary folder)")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke and args.device != "cpu"
    if args.cpu_smoke:
        args.warmup, args.mixed_precision, args.save_dtype = 1, "no", "fp32"
        args.size, args.iters = "tiny", 4
        args.sweep = args.sweep or "lora4+ckpt,full"
        torch.set_num_threads(args.threads or 1)
    elif args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: run on a GPU, or pass --device cpu --size tiny")
        return 1
    elif not cuda and args.size == "full":
        print("CUDA is not available: run on a GPU, or pass --cpu-smoke for the tiny CPU run")
        return 1
    elif args.threads:
        torch.set_num_threads(args.threads)
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    args.save_dtype = args.save_dtype or ("bf16" if cuda else "fp32")
    if args.warmup is None:
        args.warmup = 2 if args.breakdown else 5
    if args.sweep is None:
        args.sweep = ("lora64+ckpt" if args.size == "full" else "lora4+ckpt") if args.breakdown else \
            "lora64,lora64+ckpt,full+ckpt"
    methods = [m for m in (args.methods or args.method).split(",") if m]
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
        if args.breakdown:
            rows = [breakdown_one(args, m, v, teacher, data, root, "cuda" if cuda else "cpu")
                    for m in methods for v in variants]
        else:
            rows = [run_one(args, v, teacher, data, root) for v in variants]
    device = (torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {torch.get_num_threads()} "
              "thread(s))")
    if args.breakdown:
        result = {"benchmark": "diffusers_train_breakdown", "arch": args.arch, "size": args.size, "methods": methods,
                  "batch_size": args.batch_size, "resolution": list(res), "mixed_precision": args.mixed_precision,
                  "saved_dtype": args.save_dtype, "repeats": args.repeats, "warmup": args.warmup,
                  "record": args.record, "device": device, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "pipeline_build_s": round(build_s, 1), "rows": rows}
        print_breakdown(result)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
            print(f"wrote {args.out}")
        return 0
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
