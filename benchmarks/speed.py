"""Overheads of the sampler engine and of the trainer, relative to the bare network calls they make.

Prints a table and writes JSON. Run from the repository root:

    python benchmarks/speed.py
    python benchmarks/speed.py --models toy:checkerboard digits --methods cd lcm --batch 256 --out /tmp/speed.json

(a) engine: the time of `fewstep sample --steps 1` per batch (generate(): per-sample seeded noise, the
    few-step sampler, conversions) divided by one bare forward of the same network on the same batch.
    The limit is 1.0.
(b) trainer: one training iteration (every phase, optimizer steps, EMAs) divided by the sum of the
    network calls it makes, each replayed alone (forward under no_grad for frozen calls, forward +
    backward for trained ones; `benchmarks/call_replay.py`, shared with `diffusers_train.py --breakdown`).
    The limit is about 1.0 (the optimizer and the loss arithmetic are the rest).
(c) pairs: teacher (noise, sample) pairs per second written to disk by `fewstep pairs` (generate_pairs: seeded
    noise, the Heun solver, one safetensors shard) against the bare cost of the solver's network calls
    (2 * steps - 1 forwards per pair for Heun, each timed alone at the same batch). The limit is 1.0.
Times are medians over --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from call_replay import median_time as _median_time  # noqa: E402  (benchmarks/call_replay.py)
from call_replay import trainer_breakdown  # noqa: E402

from fewstep.api import load_model  # noqa: E402
from fewstep.methods import available_methods


def engine_overhead(spec: str, batch: int, repeats: int) -> dict:
    from fewstep.sampling import generate

    den = load_model(spec).eval()
    shape = den.data_shape
    x = torch.randn(batch, *shape)
    t = torch.full((batch,), float(den.process.t_max))
    cond = torch.arange(batch) % den.num_classes if den.cond_kind == "class" else None

    def bare():
        with torch.no_grad():
            den.net(x, t, cond)

    def engine():
        generate(den, batch, steps=1, solver="fewstep", batch_size=batch)

    tb, te = _median_time(bare, repeats), _median_time(engine, repeats)
    return {"model": spec, "batch": batch, "bare_forward_ms": tb * 1e3, "sample_1step_ms": te * 1e3,
            "ratio": te / tb}


def trainer_overhead(method: str, teacher: str, batch: int, repeats: int) -> dict:
    """`method` is METHOD or METHOD:KEY=VALUE,KEY=VALUE (method options, e.g. fewer reflow pairs to make first)."""
    from fewstep.training.config import parse_option
    from fewstep.training.run import plan_run
    from fewstep.training.trainer import Trainer

    label = method
    method, _, rest = method.partition(":")
    options = dict(parse_option(o) for o in rest.split(",") if o.strip())
    with tempfile.TemporaryDirectory() as tmp:
        values = {"method": method, "teacher": teacher, "batch_size": batch, "out": str(Path(tmp) / "run"),
                  "iters": 100_000, "eval": False, "sample_every": 0, "checkpoint_every": 0, "log_every": 0,
                  "warmup": 0, "options": options}
        plan = plan_run(values, explicit=set(values))
        tr = Trainer(plan.config, teacher=plan.teacher, method=plan.method, reloadable_teacher=True)
        res = trainer_breakdown(tr, repeats=repeats, warmup=2)
    return {"method": label, "teacher": teacher, "batch": batch, "step_ms": res["step_ms"],
            "network_calls_ms": res["network_calls_ms"], "calls": res["calls"], "ratio": res["ratio"]}


def pair_throughput(spec: str, batch: int, steps: int, repeats: int) -> dict:
    from fewstep.sampling.pairs import generate_pairs

    den = load_model(spec).eval()
    x = torch.randn(batch, *den.data_shape)
    t = torch.full((batch,), 0.5 * float(den.process.t_max))
    cond = torch.arange(batch) % den.num_classes if den.cond_kind == "class" else None
    nfe = 2 * steps - 1  # Heun: two evaluations per step, one for the last step to clean data

    def bare():
        with torch.no_grad():
            den.net(x, t, cond)

    with tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(10**6))

        def make():
            generate_pairs(den, Path(tmp) / f"p{next(runs)}", batch, steps=steps, solver="heun", shard_size=batch,
                           batch_size=batch)

        t_pairs = _median_time(make, repeats, warmup=1)
    t_fwd = _median_time(bare, max(repeats, 5))
    return {"model": spec, "batch": batch, "steps": steps, "solver": "heun", "nfe_per_pair": nfe,
            "pairs_per_second": batch / t_pairs, "bare_pairs_per_second": batch / (nfe * t_fwd),
            "ratio": t_pairs / (nfe * t_fwd)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["toy:checkerboard", "digits"])
    ap.add_argument("--methods", nargs="*", default=None,
                    help="METHOD or METHOD:KEY=VALUE,KEY=VALUE (default: every registered method)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--pair-batch", type=int, default=1024, help="pairs per batch (and per shard) for (c)")
    ap.add_argument("--pair-steps", type=int, default=16, help="Heun steps for (c)")
    ap.add_argument("--pair-repeats", type=int, default=3)
    ap.add_argument("--only", choices=("engine", "trainer", "pairs"), nargs="*", default=None,
                    help="run only these parts (default: all)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"))
    args = ap.parse_args(argv)
    parts = set(args.only or ("engine", "trainer", "pairs"))
    engine = [engine_overhead(m, args.batch, args.repeats) for m in args.models] if "engine" in parts else []
    if engine:
        print("(a) sampler engine: `fewstep sample --steps 1` per batch / one bare forward")
        print(f"{'model':<18} {'batch':>6} {'bare ms':>9} {'sample ms':>10} {'ratio':>6}")
    for r in engine:
        print(f"{r['model']:<18} {r['batch']:>6} {r['bare_forward_ms']:>9.2f} {r['sample_1step_ms']:>10.2f} "
              f"{r['ratio']:>6.2f}")
    trainer = [trainer_overhead(me, mo, args.batch, args.repeats) for me in (args.methods or available_methods())
               for mo in args.models] if "trainer" in parts else []
    if trainer:
        print("\n(b) trainer: one iteration / the sum of its network calls replayed alone")
        print(f"{'method':<8} {'teacher':<18} {'batch':>6} {'step ms':>9} {'calls ms':>9} {'ratio':>6}  calls")
    for r in trainer:
        print(f"{r['method'].split(':')[0]:<8} {r['teacher']:<18} {r['batch']:>6} {r['step_ms']:>9.2f} "
              f"{r['network_calls_ms']:>9.2f} {r['ratio']:>6.2f}  {r['calls']}")
    pairs = [pair_throughput(m, args.pair_batch, args.pair_steps, args.pair_repeats)
             for m in args.models] if "pairs" in parts else []
    if pairs:
        print("\n(c) pairs: `fewstep pairs` throughput (Heun, one shard per batch) / the bare network calls it makes")
        print(f"{'model':<18} {'batch':>6} {'steps':>6} {'NFE':>4} {'pairs/s':>9} {'bare pairs/s':>13} {'ratio':>6}")
    for r in pairs:
        print(f"{r['model']:<18} {r['batch']:>6} {r['steps']:>6} {r['nfe_per_pair']:>4} {r['pairs_per_second']:>9.1f} "
              f"{r['bare_pairs_per_second']:>13.1f} {r['ratio']:>6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"engine": engine, "trainer": trainer, "pairs": pairs, "torch": torch.__version__,
                                    "threads": torch.get_num_threads(), "machine": platform.machine(),
                                    "python": platform.python_version()}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
