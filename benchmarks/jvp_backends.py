"""Cost of sCM's JVP (dF/dt along (dx/dt, 1)) by backend, relative to one forward pass of the same network.

Prints a table and writes JSON. Run from the repository root:

    python benchmarks/jvp_backends.py
    python benchmarks/jvp_backends.py --models digits dit --batch 64 --repeats 20 --out /tmp/jvp.json

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
    ap.add_argument("--batch", type=int, default=None, help="default: 256 toy, 64 digits, 32 diffusers models")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/jvp_backends.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    default_batch = {"toy": 256, "digits": 64, "unet2d": 32, "dit": 32}
    rows = []
    for name in args.models:
        rows.append(run_model(name, args.batch or default_batch[name], args.repeats, device))
        print_table(rows[-1:])
    print()
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                    "device": str(device), "machine": platform.machine(),
                                    "python": platform.python_version()}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
