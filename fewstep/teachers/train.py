"""Train a flow-matching teacher (Lipman et al. 2023; Liu et al. 2023) on built-in data or an image folder.

x_t = (1 - t) x0 + t eps, the network predicts the velocity eps - x0 (MSE), AdamW with linear warm-up
and cosine decay, gradient clipping, an EMA of the weights (the EMA is the saved teacher), and
classifier-free label dropout for class-conditional data (Ho & Salimans 2022).

    fewstep teacher train --data toy:checkerboard --out my_teacher
    python -m fewstep.teachers.train --data toy:checkerboard --out my_teacher   (same flags)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import time
from pathlib import Path

import torch

from fewstep.data import canonical_data_name, get_data
from fewstep.diffusion.processes import RectifiedFlow
from fewstep.diffusion.timesteps import sample_timesteps
from fewstep.errors import FewstepError
from fewstep.models.denoiser import Denoiser
from fewstep.models.io import save_denoiser
from fewstep.models.networks import build_network

DEFAULTS = {
    "2d": {"iters": 6000, "batch_size": 512, "lr": 2e-3, "t_sampler": "uniform",
           "network": {"type": "mlp", "width": 128, "depth": 3, "time_scale": 1000.0}},
    "image": {"iters": 6000, "batch_size": 128, "lr": 1e-3, "t_sampler": "logit_normal",
              "network": {"type": "unet", "base": 16, "mults": [1, 2], "num_res": 1, "time_scale": 1000.0}},
}


def _check_out(out: Path) -> None:
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise FewstepError(f"--out {str(out)!r} already exists and is not empty; choose a new directory "
                           "(nothing is overwritten)")


def _command_line(data, out, iters, batch_size, lr, seed, resolution, prefix=("fewstep", "teacher", "train"),
                  dtype: str = "fp32") -> str:
    """The command line that reproduces a run (every default made explicit; the device is recorded apart)."""
    parts = [*prefix, "--data", data, "--out", str(out), "--iters", str(iters),
             "--batch-size", str(batch_size), "--lr", str(lr), "--seed", str(seed)]
    if resolution:
        parts += ["--resolution", str(resolution)]
    if dtype != "fp32":
        parts += ["--dtype", dtype]
    return shlex.join(parts)


def image_mults(height: int, width: int, lowest: int = 4, max_levels: int = 5) -> list[int]:
    """UNet channel multipliers [1, 2, 2, ...]: halve the image while both sides stay even and > `lowest`."""
    mults = [1]
    h, w = height, width
    while len(mults) < max_levels and h % 2 == 0 and w % 2 == 0 and min(h, w) > lowest:
        mults.append(2)
        h, w = h // 2, w // 2
    return mults


def lr_at(step: int, total: int, base: float, warmup: int = 200, final_frac: float = 0.05) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to final_frac * base."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def train_teacher(
    data: str,
    out: str | Path,
    *,
    iters: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    ema_decay: float = 0.999,
    cond_dropout: float = 0.1,
    progress=None,
    resolution: int | None = None,
    network: dict | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
) -> dict:
    """Train a flow-matching teacher on `data` and save it (EMA weights) to the new directory `out`.

    None arguments take per-data defaults (see DEFAULTS). `progress(step, total, loss)` is called
    every iteration. Returns a JSON-able summary. `device`: auto | cpu | cuda | cuda:N; `dtype`: the precision
    of the forward pass, auto | fp32 | bf16 | fp16 (autocast; the weights, their EMA and the saved teacher stay
    float32; fp16 scales the loss). Batches, times and noise are drawn on the CPU from the seed, so a run on
    another device sees the same data.
    """
    import contextlib

    from fewstep.devices import dtype_name, resolve_device, resolve_dtype

    out = Path(out)
    _check_out(out)
    for name, v in (("--iters", iters), ("--batch-size", batch_size)):
        if v is not None and v < 1:
            raise FewstepError(f"{name} must be >= 1, got {v}")
    if lr is not None and not lr > 0:
        raise FewstepError(f"--lr must be > 0, got {lr}")
    data = canonical_data_name(str(data))
    source = get_data(data, resolution=resolution)
    d = DEFAULTS[source.kind]
    iters = int(iters or d["iters"])
    batch_size = int(batch_size or d["batch_size"])
    lr = float(lr or d["lr"])
    net_cfg = dict(network or d["network"])
    if source.kind == "2d":
        net_cfg["dim"] = source.shape[0]
    else:
        net_cfg["in_channels"] = source.shape[0]
        if network is None:
            net_cfg["mults"] = image_mults(source.shape[1], source.shape[2])
    net_cfg["num_classes"] = source.num_classes

    dev = resolve_device(device)
    half = resolve_dtype(dtype, dev, diffusers=False)
    precision = dtype_name(half)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    process = RectifiedFlow()
    net = build_network(net_cfg).to(dev)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    autocast = (torch.autocast(dev.type, dtype=half) if half != torch.float32 else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(dev.type) if half == torch.float16 else None
    nparams = sum(p.numel() for p in net.parameters())

    t0 = time.perf_counter()
    loss_avg = None
    for step in range(iters):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, iters, lr)
        x0, labels = source.sample(batch_size, gen)
        if labels is not None and cond_dropout > 0:
            drop = torch.rand(batch_size, generator=gen) < cond_dropout
            labels = torch.where(drop, torch.full_like(labels, source.num_classes), labels)
        t = sample_timesteps(batch_size, process, d["t_sampler"], generator=gen).float()
        eps = torch.randn(x0.shape, generator=gen)
        x_t = process.add_noise(x0, eps, t)
        x_t, t, target = x_t.to(dev), t.to(dev), (eps - x0).to(dev)
        labels = labels.to(dev) if labels is not None else None
        with autocast:
            pred = net(x_t, t, labels)
        loss = (pred.float() - target).pow(2).mean()
        if not torch.isfinite(loss):
            raise FewstepError(f"teacher training diverged at iteration {step} (loss {loss.item()}); try a lower --lr")
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if progress is not None:
            progress(step + 1, iters, loss_avg)
    seconds = time.perf_counter() - t0

    summary = {"data": data, "iters": iters, "batch_size": batch_size, "lr": lr, "seed": seed,
               "final_loss": round(float(loss_avg), 5), "seconds": round(seconds, 1), "params": nparams,
               "device": str(dev), "dtype": precision, "out": str(out)}
    meta = {
        "data": data,
        "kind": source.kind,
        "default_steps": 50,
        "default_solver": "heun",
        "train_command": _command_line(data, out, iters, batch_size, lr, seed, resolution, dtype=precision),
        "train_command_python": _command_line(data, out, iters, batch_size, lr, seed, resolution,
                                              (".venv/bin/python", "-m", "fewstep.teachers.train"), dtype=precision),
        "trained_with": {k: v for k, v in summary.items() if k != "out"},
    }
    den = Denoiser(ema.cpu(), process, "flow", cond_kind="class" if source.num_classes else "none",
                   num_classes=source.num_classes, data_shape=source.shape, meta=meta)
    save_denoiser(den, out)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train a flow-matching teacher (same flags as `fewstep teacher train`).")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resolution", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args(argv)
    every = max(1, (a.iters or 1000) // 20)

    def progress(step, total, loss):
        if step % every == 0 or step == total:
            print(f"{step}/{total} loss {loss:.4f}", flush=True)

    res = train_teacher(a.data, a.out, iters=a.iters, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                        resolution=a.resolution, progress=progress, device=a.device, dtype=a.dtype)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
