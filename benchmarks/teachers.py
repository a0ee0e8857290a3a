"""Built-in teachers: quality metric vs sampling steps for every solver.

Prints a table and writes JSON. Run from the repository root:

    python benchmarks/teachers.py                      # all built-in teachers
    python benchmarks/teachers.py --teachers toy:checkerboard --num 2048 --out /tmp/teachers.json

Metric: each teacher's default (sliced Wasserstein distance to held-out data for 2-D toys, FD-digits
for digits); lower is better. The "floor" column is what real data scores at the same sample size
(an independent held-out set for toys; training images drawn with replacement for digits).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from fewstep.data import get_data
from fewstep.eval import default_metric, evaluate
from fewstep.sampling import generate
from fewstep.teachers import BUILTIN_TEACHERS, load_teacher

STEPS = (1, 2, 4, 8, 16, 50)
SOLVERS = ("euler", "heun", "dpm++2m")


def floor_value(data_name: str, metric: str, num: int) -> float:
    """What real data scores at the same sample size: an independent held-out set (toys), or
    `num` training images drawn with replacement (digits; what a model that copies its data gets)."""
    data = get_data(data_name)
    if data.kind == "2d":
        a, _ = data.reference(num, seed=1)
        return evaluate(metric, a, data=data_name)["value"]
    x, _ = data.sample(num, torch.Generator().manual_seed(1))
    return evaluate(metric, x, data=data_name)["value"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teachers", nargs="*", default=list(BUILTIN_TEACHERS))
    ap.add_argument("--steps", nargs="*", type=int, default=list(STEPS))
    ap.add_argument("--solvers", nargs="*", default=list(SOLVERS))
    ap.add_argument("--num", type=int, default=4096, help="samples per cell (digits: at most 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/teachers.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    rows = []
    for name in args.teachers:
        den = load_teacher(name)
        data_name = den.meta.get("data", name)
        metric = default_metric(data_name)
        num = args.num if den.data_shape and len(den.data_shape) == 1 else min(args.num, 2000)
        floor = floor_value(data_name, metric, num)
        for solver in args.solvers:
            for steps in args.steps:
                t0 = time.perf_counter()
                x, labels = generate(den, num, steps=steps, solver=solver, seed=args.seed)
                secs = time.perf_counter() - t0
                res = evaluate(metric, x, data=data_name, labels=labels)
                nfe = {"euler": steps, "heun": 2 * steps - 1, "dpm++2m": steps}[solver]
                row = {"teacher": name, "solver": solver, "steps": steps, "nfe": nfe, "metric": metric,
                       "value": res["value"], "floor": floor, "num": num, "seconds": round(secs, 3)}
                if "coverage" in name or data_name == "toy:gaussians8":
                    cov = evaluate("coverage", x)
                    row["min_mode_fraction"] = cov["min_fraction"]
                rows.append(row)
                print(f"{name:18s} {solver:8s} steps={steps:3d} nfe={nfe:3d} {metric}={res['value']:.4f} "
                      f"(floor {floor:.4f}) {secs:.2f}s", flush=True)

    # table: one row per (teacher, solver), one column per step count
    print()
    header = "| teacher | metric | solver | floor | " + " | ".join(f"{s} steps" for s in args.steps) + " |"
    print(header)
    print("|" + "---|" * (4 + len(args.steps)))
    for name in args.teachers:
        for solver in args.solvers:
            cells = [r for r in rows if r["teacher"] == name and r["solver"] == solver]
            if not cells:
                continue
            vals = " | ".join(f"{c['value']:.4f}" for c in cells)
            print(f"| {name} | {cells[0]['metric']} | {solver} | {cells[0]['floor']:.4f} | {vals} |")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "teachers", "torch": torch.__version__, "machine": platform.machine(),
               "threads": torch.get_num_threads(), "rows": rows}
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
