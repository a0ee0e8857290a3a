"""Runs the Triton attention kernel in Triton's CPU interpreter, in a process of its own.

TRITON_INTERPRET=1 has to be set before triton is first imported and changes every `@triton.jit`
function in the process, so the interpreter tests (test_flash_attention_interpreter.py) run their
kernel calls here, in one subprocess, and compare the results in the test process:

    TRITON_INTERPRET=1 python interpreter_worker.py cases.json inputs.safetensors outputs.safetensors

`cases.json` lists {"name", "op", "scale"}; inputs are `<name>.q`, `<name>.k`, ... and outputs
`<name>.<output>` (o, to, dq, dk, dv). Timings per case go to `<outputs>.json`.
"""

from __future__ import annotations

import json
import os
import sys
import time

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def run_case(op: str, x: dict, scale):
    import fewstep_kernels
    from fewstep_kernels import attention, attention_jvp

    q, k, v = x["q"], x["k"], x["v"]
    tq, tk, tv = x.get("tq"), x.get("tk"), x.get("tv")

    def f(a, b, c):
        return attention(a, b, c, scale=scale, backend="triton")

    if op == "forward":
        return {"o": f(q, k, v)}
    if op == "jvp":
        o, to = attention_jvp(q, k, v, tq, tk, tv, scale=scale, backend="triton")
        return {"o": o, "to": to}
    if op == "jvp_strided":
        # (B, L, H, D) memory viewed as (B, H, L, D): the kernel reads through strides
        views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, tq, tk, tv)]
        assert not views[0].is_contiguous()
        o, to = attention_jvp(*views, scale=scale, backend="triton")
        return {"o": o, "to": to}
    if op == "jvp_mixed_layout":
        # contiguous primals with tangents in another memory layout: each tensor's own strides are used
        tangents = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (tq, tk, tv)]
        assert not tangents[0].is_contiguous() and q.is_contiguous()
        o, to = attention_jvp(q, k, v, *tangents, scale=scale, backend="triton")
        return {"o": o, "to": to}
    if op == "jvp_split_batches":
        # pretend the grid's second axis holds only 2 programs: one launch per batch element
        from fewstep_kernels import flash_attention

        limit, flash_attention._MAX_GRID_Y = flash_attention._MAX_GRID_Y, 2
        try:
            o, to = attention_jvp(q, k, v, tq, tk, tv, scale=scale, backend="triton")
        finally:
            flash_attention._MAX_GRID_Y = limit
        return {"o": o, "to": to}
    if op == "func_jvp":
        o, to = torch.func.jvp(f, (q, k, v), (tq, tk, tv))
        return {"o": o, "to": to}
    if op == "func_jvp_q_only":
        o, to = torch.func.jvp(lambda a: f(a, k, v), (q,), (tq,))
        return {"o": o, "to": to}
    if op == "forward_ad":
        from torch.autograd import forward_ad

        with forward_ad.dual_level():
            out = f(forward_ad.make_dual(q, tq), forward_ad.make_dual(k, tk), forward_ad.make_dual(v, tv))
            o, to = forward_ad.unpack_dual(out)
        return {"o": o, "to": to}
    if op == "vmap_jvp":
        # vmap over the batch dim of a per-sample jvp; the kernel's vmap rule folds it into B
        def per_sample(a, b, c, ta, tb, tc):
            return torch.func.jvp(f, (a, b, c), (ta, tb, tc))

        o, to = torch.func.vmap(per_sample)(q, k, v, tq, tk, tv)
        return {"o": o, "to": to}
    if op == "backward":
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        f(q, k, v).backward(x["grad"])
        return {"dq": q.grad, "dk": k.grad, "dv": v.grad}
    if op == "autotuned_jvp":
        # the CUDA path's autotuner, run in the interpreter with a stand-in timer that makes each later
        # candidate look faster: every candidate of the variant is timed and the last one is launched
        from fewstep_kernels import flash_attention as fa

        timed = []

        def fake_bench(fn, quantiles=None, **_):
            fn()
            timed.append(1)
            return [100.0 - len(timed)] * 3

        tuned = fa.autotuned_kernel(do_bench=fake_bench)
        use, fa._use_autotune = fa._use_autotune, lambda _q: True
        get, fa.autotuned_kernel = fa.autotuned_kernel, lambda do_bench=None: tuned
        try:
            o, to = attention_jvp(q, k, v, tq, tk, tv, scale=scale, backend="triton")
        finally:
            fa._use_autotune, fa.autotuned_kernel = use, get
        best = tuned.best_config
        chosen = [best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages]
        return {"o": o, "to": to, "timed": torch.tensor(len(timed)), "chosen": torch.tensor(chosen)}
    if op == "dispatch":
        # "auto" stays on the reference for CPU tensors even with the interpreter loaded
        backend = fewstep_kernels.resolve_backend("auto", q, k, v)
        return {"o": f(q, k, v), "auto_is_reference": torch.tensor(backend == "reference")}
    raise ValueError(f"unknown op {op}")


def main(cases_path: str, inputs_path: str, outputs_path: str) -> None:
    from fewstep_kernels import flash_attention

    assert flash_attention.INTERPRETED, "triton was imported without TRITON_INTERPRET=1"
    cases = json.loads(open(cases_path).read())
    inputs = load_file(inputs_path)
    outputs, timings = {}, {}
    for case in cases:
        name = case["name"]
        x = {key.rsplit(".", 1)[1]: t for key, t in inputs.items() if key.rsplit(".", 1)[0] == name}
        start = time.perf_counter()
        result = run_case(case["op"], x, case.get("scale"))
        timings[name] = time.perf_counter() - start
        for key, t in result.items():
            outputs[f"{name}.{key}"] = t.detach().contiguous()
    save_file(outputs, outputs_path)
    with open(outputs_path + ".json", "w") as fh:
        json.dump(timings, fh)


if __name__ == "__main__":
    main(*sys.argv[1:4])
