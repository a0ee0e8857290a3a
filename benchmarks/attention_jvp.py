"""Attention JVP: the fused Triton kernel vs torch.func.jvp over math attention vs finite differences.

Prints a table (time per call, peak extra GPU memory, max error of the tangent against the
float32-accumulating chunked reference) and writes JSON. Run from the repository root on a CUDA machine:

    python benchmarks/attention_jvp.py                          # L = 1k, 4k, 16k; D = 64, 128; bf16
    python benchmarks/attention_jvp.py --seq 4096 --head-dims 128 --out /tmp/attention_jvp.json
    python benchmarks/attention_jvp.py --cpu-smoke              # tiny sizes on CPU (reference path)

Methods, all giving the tangent `to` of o = softmax(q k^T / sqrt(D)) v along (tq, tk, tv):
  fused_jvp        fewstep_kernels.attention_jvp, one Triton pass (o and to together; O(L) memory)
  func_jvp_kernel  torch.func.jvp(fewstep_kernels.attention): what a model pays under forward-mode AD
                   (the forward kernel, then the tangent kernel that reads the forward's o)
  func_jvp_math    torch.func.jvp of softmax(q k^T) v written out (O(L^2) memory; OOM is recorded)
  finite_diff      (o(x + h t) - o(x - h t)) / 2h with two flash forwards (SDPA); h = 1e-2 in bf16
  reference_jvp    the PyTorch fallback, chunked over queries
and, for scale, two forwards alone: flash_forward (SDPA) and kernel_forward (the fused kernel
without the tangent). On CUDA the kernel's tiles are autotuned per shape (the first call times the
candidates; warm-up calls absorb it); fused_jvp_fixed and kernel_forward_fixed run the untuned fixed
tiles (FEWSTEP_ATTENTION_AUTOTUNE=0) for comparison, and the tiles the autotuner chose go into the JSON.
Every row's `x_flash` is its time over flash_forward's at the same (L, D), measured in the same run; the
goals are fused_jvp <= 3.0x and kernel_forward <= 1.25x. With --cpu-smoke the Triton rows are skipped and
SDPA is the CPU one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fewstep_kernels import attention, attention_jvp

DEFAULT_OUT = Path("benchmarks/results/attention_jvp.json")


def math_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * (1.0 / math.sqrt(q.shape[-1])), dim=-1) @ v


def make_methods(cuda: bool, fd_step: float):
    def fused_jvp(x):
        return attention_jvp(*x, backend="triton")[1]

    def func_jvp_kernel(x):
        return torch.func.jvp(lambda q, k, v: attention(q, k, v, backend="triton"), tuple(x[:3]), tuple(x[3:]))[1]

    def func_jvp_math(x):
        return torch.func.jvp(math_attention, tuple(x[:3]), tuple(x[3:]))[1]

    def finite_diff(x):
        q, k, v, tq, tk, tv = x
        plus = F.scaled_dot_product_attention(q + fd_step * tq, k + fd_step * tk, v + fd_step * tv)
        minus = F.scaled_dot_product_attention(q - fd_step * tq, k - fd_step * tk, v - fd_step * tv)
        return (plus.float() - minus.float()) / (2 * fd_step)

    def reference_jvp(x):
        return attention_jvp(*x, backend="reference")[1]

    def flash_forward(x):
        return F.scaled_dot_product_attention(*x[:3])

    def kernel_forward(x):
        return attention(*x[:3], backend="triton")

    def fixed(fn):
        def run(x):
            with fixed_tiles():
                return fn(x)

        return run

    methods = {"fused_jvp": fused_jvp, "fused_jvp_fixed": fixed(fused_jvp), "func_jvp_kernel": func_jvp_kernel,
               "func_jvp_math": func_jvp_math, "finite_diff": finite_diff, "reference_jvp": reference_jvp,
               "flash_forward": flash_forward, "kernel_forward": kernel_forward,
               "kernel_forward_fixed": fixed(kernel_forward)}
    if not cuda:
        for name in ("fused_jvp", "fused_jvp_fixed", "func_jvp_kernel", "kernel_forward", "kernel_forward_fixed"):
            methods.pop(name)
    return methods


@contextlib.contextmanager
def fixed_tiles():
    """The kernel's fixed tiles instead of the autotuner's (FEWSTEP_ATTENTION_AUTOTUNE=0 while open)."""
    old = os.environ.get("FEWSTEP_ATTENTION_AUTOTUNE")
    os.environ["FEWSTEP_ATTENTION_AUTOTUNE"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["FEWSTEP_ATTENTION_AUTOTUNE"]
        else:
            os.environ["FEWSTEP_ATTENTION_AUTOTUNE"] = old


def add_ratios(rows):
    """x_flash: each row's time over flash_forward's at the same (L, D) (None where either is missing)."""
    flash = {(r["L"], r["D"]): r["ms"] for r in rows if r["method"] == "flash_forward"}
    for r in rows:
        base = flash.get((r["L"], r["D"]))
        r["x_flash"] = None if r["ms"] is None or not base else round(r["ms"] / base, 2)


def time_call(fn, x, device: str, warmup: int, repeat: int):
    """(median milliseconds, peak extra memory in MB or None on CPU, last output)."""
    out = None
    for _ in range(warmup):
        out = fn(x)
    out = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
            del out
        out = fn(x)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return statistics.median(times), peak, out
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), None, out


def run_cell(name, fn, x, tangent_ref, device, warmup, repeat):
    row = {"method": name}
    try:
        ms, peak, out = time_call(fn, x, device, warmup, repeat)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        row.update(status="OOM", ms=None, peak_mb=None, max_err=None)
        return row
    row.update(status="ok", ms=round(ms, 4), peak_mb=None if peak is None else round(peak, 1))
    is_tangent = name not in ("flash_forward", "kernel_forward")
    row["max_err"] = float((out.float() - tangent_ref).abs().max()) if is_tangent else None
    del out
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", nargs="*", type=int, default=[1024, 4096, 16384], help="sequence lengths (Lq = Lk)")
    ap.add_argument("--head-dims", nargs="*", type=int, default=[64, 128])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--methods", nargs="*", default=None, help="subset of methods to run")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: tiny sizes on CPU (reference path, no Triton rows) to exercise the script")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("CUDA is not available: this benchmark needs a GPU (--cpu-smoke runs tiny sizes on CPU instead).")
        return 1
    device = "cuda" if cuda else "cpu"
    if args.cpu_smoke and not cuda:
        args.seq = [s for s in args.seq if s <= 256] or [64, 128]
        args.head_dims = [d for d in args.head_dims if d <= 64] or [32, 64]
        args.heads = min(args.heads, 2)
        args.warmup, args.repeat = min(args.warmup, 1), min(args.repeat, 2)
    dtype = getattr(torch, args.dtype)
    fd_step = 1e-3 if dtype == torch.float32 else 1e-2
    methods = make_methods(cuda, fd_step)
    if args.methods:
        unknown = sorted(set(args.methods) - set(methods))
        if unknown:
            ap.error(f"unknown or unavailable methods {unknown}; available: {', '.join(methods)}")
        methods = {k: v for k, v in methods.items() if k in args.methods}

    rows = []
    for D in args.head_dims:
        for L in args.seq:
            g = torch.Generator(device=device).manual_seed(0)
            shape = (args.batch, args.heads, L, D)
            x = [torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype) for _ in range(6)]
            tangent_ref = attention_jvp(*x, backend="reference")[1].float()
            for name, fn in methods.items():
                row = {"B": args.batch, "H": args.heads, "L": L, "D": D, "dtype": args.dtype}
                row.update(run_cell(name, fn, x, tangent_ref, device, args.warmup, args.repeat))
                rows.append(row)
                ms = "-" if row["ms"] is None else f"{row['ms']:.3f}"
                print(f"L={L:6d} D={D:4d} {name:14s} {row['status']:3s} {ms:>10s} ms", flush=True)
            del x, tangent_ref

    add_ratios(rows)
    print()
    print("| L | D | method | ms | x flash SDPA fwd | peak MB | max err of tangent |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r["status"] if r["ms"] is None else f"{r['ms']:.3f}"
        ratio = "-" if r["x_flash"] is None else f"{r['x_flash']:.2f}x"
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        err = "-" if r["max_err"] is None else f"{r['max_err']:.2e}"
        print(f"| {r['L']} | {r['D']} | {r['method']} | {ms} | {ratio} | {peak} | {err} |")

    payload = {"benchmark": "attention_jvp", "device": torch.cuda.get_device_name() if cuda else platform.processor()
               or platform.machine(), "cpu_smoke": not cuda, "torch": torch.__version__,
               "triton": _triton_version(), "dtype": args.dtype, "rows": rows,
               "autotuned_tiles": _autotuned_tiles() if cuda else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {args.out}")
    return 0


def _autotuned_tiles():
    """{autotuner key: chosen config} of the kernel's CUDA autotuner (empty if it never ran)."""
    from fewstep_kernels import flash_attention

    tuner = flash_attention.autotuned_kernel()
    return {str(key): str(config) for key, config in getattr(tuner, "cache", {}).items()}


def _triton_version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
