"""Cost of sCM's JVP (dF/dt along (dx/dt, 1)) by backend, relative to one forward pass of the same network.

Prints a table and writes JSON. Run from the repository root:

    python benchmarks/jvp_backends.py
    python benchmarks/jvp_backends.py --models digits dit --batch 64 --repeats 20 --out /tmp/jvp.json
    python benchmarks/jvp_backends.py --arch sdxl sd3 flux --size tiny            # teacher families, CPU
    python benchmarks/jvp_backends.py --arch sdxl sd3 --size full --dtype bf16 --device cuda --batch 2

--arch runs the teacher families instead (random-weight diffusers pipelines, `fewstep.teachers.random_pipelines`,
at their default resolution: 1024 px for full SDXL/SD3/Flux): the network is called as sCM calls it (TrigFlow
view, text conditions), first in float32 with torch.func for the reference tangent, then cast to --dtype for
the timed forward and the kernel, func and fd backends. Each row has times, ratios to the forward, CUDA peak
memory, relative L2 error against the float32 reference and the attention paths the kernel backend took
(triton / reference / masked). On a GPU the goal is kernel <= 2.5x the forward for full SDXL and SD3.

For each network: a plain forward under no_grad (the unit), then `fewstep.models.jvp.jvp` with backend
kernel (forward-mode AD, diffusers attention routed through fewstep_kernels.attention), func (forward-mode
AD, SDPA on its math backend, GroupNorm fix) and fd (central differences: two forwards); their times,
ratios to the forward, the relative L2 difference of each from func (fp32: fd's truncation and
round-off), and what backend "auto" settles on. The built-in networks are called through the TrigFlow
view of their Denoiser (as sCM calls them); the diffusers ones (a tiny UNet2DModel with attention, a
tiny DiT) are called directly. Times are medians over --repeats runs after a warm-up, in fp32 on the
device given (CPU here; the fused Triton kernel runs for fp16/bf16 CUDA inputs only).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from fewstep.models.jvp import JVP, jvp

BACKENDS = ("kernel", "func", "fd")
MODELS = ("toy", "digits", "unet2d", "dit")


def _median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(name: str, batch: int, device: torch.device):
    """(fn(x, t), primals, tangents, modules, description) for one network."""
    g = torch.Generator().manual_seed(0)
    if name in ("toy", "digits"):
        from fewstep.models.trigflow import TrigFlowDenoiser
        from fewstep.teachers import load_teacher

        den = load_teacher("toy:checkerboard" if name == "toy" else "digits").to(device).eval()
        wrapper = TrigFlowDenoiser(den, 0.5)
        cond = (torch.arange(batch) % den.num_classes).to(device) if den.conditional else None
        shape = (batch, *den.data_shape)
        t = (torch.rand(batch, generator=g, dtype=torch.float64) * 1.5 + 0.03).to(device)
        desc = f"built-in {type(den.net).__name__} ({sum(p.numel() for p in den.parameters()) / 1e3:.0f}k), TrigFlow"

        def fn(x, tt):
            return wrapper(x, tt, cond)

        modules = [den]
    else:
        import diffusers

        torch.manual_seed(0)
        if name == "unet2d":
            model = diffusers.UNet2DModel(
                sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=8, attention_head_dim=16)
            shape = (batch, 3, 16, 16)

            def fn(x, tt):
                return model(x, tt * 1000.0).sample
        else:
            model = diffusers.DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4,
                                                    out_channels=4, num_layers=2, sample_size=16, patch_size=2,
                                                    num_embeds_ada_norm=1000)
            shape = (batch, 4, 16, 16)
            labels = (torch.arange(batch) % 10).to(device)

            def fn(x, tt):
                return model(x, tt * 1000.0, class_labels=labels).sample
        model = model.to(device).eval()
        t = (torch.rand(batch, generator=g) * 0.9 + 0.05).to(device)
        desc = f"diffusers {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e3:.0f}k)"
        modules = [model]
    x = torch.randn(shape, generator=g).to(device)
    dx = torch.randn(shape, generator=g).to(device)
    return fn, (x, t), (dx, torch.ones_like(t)), modules, desc


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _timed(fn, repeats: int, device) -> float:
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return _median_time(run, repeats, warmup=1)


def run_arch(arch: str, size: str, dtype: torch.dtype, batch: int, repeats: int, device: torch.device,
             workdir: Path) -> dict:
    """One teacher family: the fp32 func reference, then forward / kernel / func / fd in `dtype`."""
    from fewstep.models.trigflow import TrigFlowDenoiser
    from fewstep.teachers import load_teacher
    from fewstep.teachers.random_pipelines import save_random_pipeline
    from fewstep_kernels import count_backends

    t0 = time.perf_counter()
    folder = save_random_pipeline(arch, workdir / f"{arch}-{size}", size=size,
                                  dtype=torch.float32 if size == "tiny" else torch.bfloat16)
    den = load_teacher(folder).eval()
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *den.data_shape, generator=g)
    dx = torch.randn(batch, *den.data_shape, generator=g)
    t = (torch.rand(batch, generator=g, dtype=torch.float64) * 1.2 + 0.2)
    words = ["a red cube", "the blue sea", "two cats", "the dark night"]
    with torch.no_grad():
        cond = den.components.encode_prompts([words[i % len(words)] for i in range(batch)])
    cond = {k: v.to(device) for k, v in cond.items()}
    x, dx, t = x.to(device), dx.to(device), t.to(device)
    den.to(device=device, dtype=torch.float32)
    wrapper = TrigFlowDenoiser(den, 0.5, through_forward=False)

    def fn(a, b):
        return wrapper(a, b, cond)

    primals, tangents = (x, t), (dx, torch.ones_like(t))
    ref = jvp(fn, primals, tangents, backend="func", modules=[den]).float()  # the fp32 reference
    den.to(dtype)
    primals, tangents = (x.to(dtype), t), (dx.to(dtype), torch.ones_like(t))
    n_params = sum(p.numel() for p in den.parameters())
    row = {"model": arch, "size": size, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
           "latent": list(den.data_shape), "params_M": round(n_params / 1e6, 1), "build_s": round(build_s, 1),
           "description": f"random {size} {arch} ({n_params / 1e6:.1f}M)", "backends": {}}

    def forward():
        with torch.no_grad():
            fn(*primals)

    _peak_reset(device)
    t_fwd = _timed(forward, repeats, device)
    row["forward_ms"], row["forward_peak_gib"] = 1e3 * t_fwd, _peak_gib(device)
    for backend in BACKENDS:
        _peak_reset(device)
        with count_backends() as counts:
            out = jvp(fn, primals, tangents, backend=backend, modules=[den])
        attention = dict(counts)
        t_b = _timed(lambda b=backend: jvp(fn, primals, tangents, backend=b, modules=[den]), repeats, device)
        row["backends"][backend] = {"ms": 1e3 * t_b, "x_forward": t_b / t_fwd, "peak_gib": _peak_gib(device),
                                    "rel_err_vs_fp32": float((out.float() - ref).norm() / ref.norm()),
                                    "attention": attention}
    row["auto_chooses"] = None
    auto = JVP("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto(fn, primals, tangents, modules=[den])
    row["auto_chooses"] = auto.chosen
    del den, wrapper
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def print_arch_table(rows):
    head = (f"{'model':<6} {'size':<5} {'dtype':<8} {'batch':>5} {'fwd ms':>9} "
            + " ".join(f"{b + ' ms':>10} {'x fwd':>6} {'rel err':>8}" for b in BACKENDS) + f" {'kernel attention':<24}")
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = " ".join(f"{r['backends'][b]['ms']:>10.2f} {r['backends'][b]['x_forward']:>6.2f} "
                         f"{r['backends'][b]['rel_err_vs_fp32']:>8.1e}" for b in BACKENDS)
        att = ",".join(f"{k}:{v}" for k, v in sorted(r["backends"]["kernel"]["attention"].items()))
        print(f"{r['model']:<6} {r['size']:<5} {r['dtype']:<8} {r['batch']:>5} {r['forward_ms']:>9.2f} {cells} "
              f"{att:<24}")
    if any(r["forward_peak_gib"] is not None for r in rows):
        print("peak GiB: " + "; ".join(f"{r['model']}: fwd {r['forward_peak_gib']}, "
                                       + ", ".join(f"{b} {r['backends'][b]['peak_gib']}" for b in BACKENDS)
                                       for r in rows))


def run_model(name: str, batch: int, repeats: int, device: torch.device) -> dict:
    fn, primals, tangents, modules, desc = build(name, batch, device)

    def forward():
        with torch.no_grad():
            fn(*primals)

    t_fwd = _median_time(forward, repeats)
    row = {"model": name, "description": desc, "batch": batch, "forward_ms": 1e3 * t_fwd, "backends": {}}
    ref = jvp(fn, primals, tangents, backend="func", modules=modules)
    for backend in BACKENDS:
        out = jvp(fn, primals, tangents, backend=backend, modules=modules)
        t = _median_time(lambda b=backend: jvp(fn, primals, tangents, backend=b, modules=modules), repeats)
        rel = float((out - ref).float().norm() / ref.float().norm().clamp_min(1e-30))
        row["backends"][backend] = {"ms": 1e3 * t, "x_forward": t / t_fwd, "rel_diff_vs_func": rel}
    auto = JVP("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto(fn, primals, tangents, modules=modules)
    row["auto_chooses"] = auto.chosen
    return row


def print_table(rows):
    head = (f"{'model':<8} {'batch':>5} {'fwd ms':>8} " + " ".join(f"{b + ' ms':>10} {'x fwd':>6}" for b in BACKENDS)
            + f" {'fd rel err':>10} {'auto':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = " ".join(f"{r['backends'][b]['ms']:>10.2f} {r['backends'][b]['x_forward']:>6.2f}" for b in BACKENDS)
        print(f"{r['model']:<8} {r['batch']:>5} {r['forward_ms']:>8.2f} {cells} "
              f"{r['backends']['fd']['rel_diff_vs_func']:>10.1e} {r['auto_chooses']:>6}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    ap.add_argument("--arch", nargs="*", default=None, help="teacher families instead of --models: sd15, sd2-v, "
                    "sdxl, sd3, flux (random-weight pipelines)")
    ap.add_argument("--size", default="tiny", choices=["tiny", "full"], help="with --arch")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                    help="with --arch: the precision of the timed runs (default: bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--batch", type=int, default=None, help="default: 256 toy, 64 digits, 32 diffusers models, 2 "
                    "teacher families")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=None, help="with --arch: where the pipelines are built")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/jvp_backends.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here: run on a GPU or pass --device cpu")
    rows = []
    if args.arch:
        import tempfile

        from fewstep.teachers.random_pipelines import RANDOM_ARCHS

        unknown = [a for a in args.arch if a not in RANDOM_ARCHS]
        if unknown:
            raise SystemExit(f"unknown --arch {', '.join(unknown)}; allowed: {', '.join(RANDOM_ARCHS)}")
        name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            for arch in args.arch:
                rows.append(run_arch(arch, args.size, dtype, args.batch or 2, args.repeats, device, Path(tmp)))
                print_arch_table(rows[-1:])
        print()
        print_arch_table(rows)
    else:
        default_batch = {"toy": 256, "digits": 64, "unet2d": 32, "dit": 32}
        for name in args.models:
            rows.append(run_model(name, args.batch or default_batch[name], args.repeats, device))
            print_table(rows[-1:])
        print()
        print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "machine": platform.machine(), "python": platform.python_version()}
    args.out.write_text(json.dumps({"rows": rows, **info}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
