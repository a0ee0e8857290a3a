"""Distilled students vs their teachers: every registered method x built-in teacher, with the method's recipe.

Prints a table and writes JSON. Run from the repository root:

    python benchmarks/quality.py                                   # every method x every built-in teacher
    python benchmarks/quality.py --methods cd --teachers toy:checkerboard digits
    python benchmarks/quality.py --methods cd --teachers digits --iters 500 --out /tmp/q.json
    python benchmarks/quality.py --methods reflow reflow:distill_1step=true --teachers toy:checkerboard digits

Each cell trains `fewstep distill --method M --teacher T` with the recipe defaults (override with
--iters / --batch-size / --opt KEY=VALUE, or per method as METHOD:KEY=VALUE,KEY=VALUE), then scores the
teacher at its best setting (its default solver and step count), the teacher at 1 Euler step, the teacher
at 2 steps with its best 2-step solver (of Euler, Heun, DPM-Solver++(2M)), and the student at 1, 2 and 4
steps, on the teacher's built-in metric (SWD for 2-D toys, FD-digits for digits; lower is better) with the
same number of samples. Ratios are student / teacher-best, student-1-step / teacher-1-step and
student-2-step / teacher-2-step. Methods that report straightness (reflow) show it for the teacher and after
the last reflow round; on toy:gaussians8 and digits, "S1 min-mode" is the 1-step student's smallest mode
(class) share of the samples (1/8 and 1/10 are ideal; distribution matching is known to drop modes). Every
measurement is in the JSON. Later methods add rows by registering themselves; nothing here is method-specific.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from fewstep.methods import available_methods
from fewstep.teachers import BUILTIN_TEACHERS, load_teacher
from fewstep.training import distill
from fewstep.training.config import parse_option
from fewstep.training.report import teacher_metric

TWO_STEP_SOLVERS = ("euler", "heun", "dpm++2m")


def parse_method(spec: str) -> tuple[str, dict]:
    """METHOD or METHOD:KEY=VALUE,KEY=VALUE (method options for that cell)."""
    name, _, rest = spec.partition(":")
    return name, dict(parse_option(o) for o in rest.split(",") if o.strip())


def teacher_two_step(teacher: str, data: str, num: int) -> dict:
    """The teacher at 2 steps with each solver (same samples and metric as the table) and the best of them."""
    den = load_teacher(teacher)
    values = {s: teacher_metric(den, teacher, data, steps=2, solver=s, num=num)["value"] for s in TWO_STEP_SOLVERS}
    best = min(values, key=values.get)
    return {"solver": best, "value": values[best], "by_solver": values}


def run_cell(method: str, teacher: str, *, iters=None, batch_size=None, options=None, eval_num=None, seed=0,
             label=None):
    with tempfile.TemporaryDirectory() as tmp:
        kw = {"method": method, "teacher": teacher, "out": str(Path(tmp) / "run"), "sample_every": 0,
              "checkpoint_every": 0, "seed": seed}
        for k, v in (("iters", iters), ("batch_size", batch_size), ("eval_num", eval_num)):
            if v is not None:
                kw[k] = v
        if options:
            kw["options"] = options
        t0 = time.perf_counter()
        res = distill(**kw)
        total = time.perf_counter() - t0
    rows = {(r["model"], r["steps"]): r["value"] for r in res["table"]}
    best = rows[("teacher (best)", next(r["steps"] for r in res["table"] if r["model"] == "teacher (best)"))]
    one = rows[("teacher", 1)]
    n = res["table"][0]["n_samples"]
    two = teacher_two_step(teacher, load_teacher(teacher).meta["data"], n)
    cell = {"method": label or method, "options": options or {}, "teacher": teacher,
            "metric": res["table"][0]["metric"], "iterations": res["iterations"],
            "train_seconds": res["train_seconds"], "total_seconds": round(total, 1),
            "n_samples": n, "teacher_best": best, "teacher_1step": one, "teacher_2step": two,
            "student": {s: rows.get(("student", s)) for s in (1, 2, 4)}}
    from fewstep.training.report import extra_columns

    for extra in extra_columns(res["table"]):  # mode / class coverage: the smallest mode's (class's) share
        cell[extra] = {f"{r['model']} {r['steps']}": r[extra] for r in res["table"] if extra in r}
    cell["ratio_1step_vs_teacher_1step"] = cell["student"][1] / one
    cell["ratio_2step_vs_teacher_2step"] = cell["student"][2] / two["value"] if cell["student"][2] else None
    cell["ratio_vs_teacher_best"] = {s: v / best for s, v in cell["student"].items() if v is not None}
    if res.get("straightness"):
        recs = res["straightness"]
        rounds = [r for r in recs if str(r["after"]).startswith("round")]
        cell["straightness"] = {"teacher": recs[0]["value"], "final": recs[-1]["value"],
                                "after_rounds": rounds[-1]["value"] if rounds else recs[-1]["value"],
                                "records": [{"after": r["after"], "value": r["value"]} for r in recs]}
    return cell


def print_table(cells):
    head = (f"{'method':<26} {'teacher':<18} {'metric':<10} {'iters':>6} {'train s':>8} {'T best':>8} {'T 1':>8} "
            f"{'T 2 (solver)':>16} {'S 1':>8} {'S 2':>8} {'S 4':>8} {'S1/T1':>6} {'S2/T2':>6} {'S1/Tb':>6} "
            f"{'S4/Tb':>6} {'S1 min-mode':>11} {'straightness T -> S':>22}")
    print(head)
    print("-" * len(head))
    for c in cells:
        s, two = c["student"], c["teacher_2step"]
        st = c.get("straightness")
        st_text = f"{st['teacher']:.4g} -> {st['after_rounds']:.4g}" if st else "-"
        cov = c.get("coverage", c.get("class-coverage", {})).get("student 1")
        cov_text = f"{cov:.4f}" if cov is not None else "-"
        def num(v, width, digits):  # "-" where the method does not sample at that step count
            return f"{v:>{width}.{digits}f}" if v is not None else f"{'-':>{width}}"

        r = c["ratio_vs_teacher_best"]
        print(f"{c['method']:<26} {c['teacher']:<18} {c['metric']:<10} {c['iterations']:>6} "
              f"{c['train_seconds']:>8.0f} {c['teacher_best']:>8.4f} {c['teacher_1step']:>8.4f} "
              f"{two['value']:>8.4f} ({two['solver']:<5}) {num(s[1], 8, 4)} {num(s[2], 8, 4)} {num(s[4], 8, 4)} "
              f"{c['ratio_1step_vs_teacher_1step']:>6.3f} {num(c['ratio_2step_vs_teacher_2step'], 6, 3)} "
              f"{num(r.get(1), 6, 2)} {num(r.get(4), 6, 2)} {cov_text:>11} {st_text:>22}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=None,
                    help="METHOD or METHOD:KEY=VALUE,KEY=VALUE (default: every registered method)")
    ap.add_argument("--teachers", nargs="*", default=list(BUILTIN_TEACHERS))
    ap.add_argument("--iters", type=int, default=None, help="override the recipe's iterations")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--opt", action="append", default=[], help="method option KEY=VALUE (repeatable)")
    ap.add_argument("--eval-num", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    args = ap.parse_args(argv)
    methods = args.methods or available_methods()
    options = dict(parse_option(o) for o in args.opt)
    cells = []
    for spec in methods:
        m, own = parse_method(spec)
        for t in args.teachers:
            print(f"== {spec} on {t}", flush=True)
            cells.append(run_cell(m, t, iters=args.iters, batch_size=args.batch_size,
                                  options={**options, **own} or None, eval_num=args.eval_num, seed=args.seed,
                                  label=spec))
            print_table(cells[-1:])
    print()
    print_table(cells)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cells": cells, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                    "machine": platform.machine(), "python": platform.python_version()}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
