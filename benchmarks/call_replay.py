"""Where a trainer's iteration goes: its time against the network calls it makes, each replayed alone.

Shared by `benchmarks/speed.py` (built-in teachers) and `benchmarks/diffusers_train.py --breakdown` (diffusers
teachers). `trainer_breakdown(trainer)`:

1. times `repeats` training iterations after `warmup` ones (the gaps between the trainer's progress callbacks, so
   the end-of-run checkpoint and the prompt cache are not counted; on CUDA the callback synchronises first);
2. records every call of each role's network (`role.module.net`) over `record` further iterations with forward hooks:
   its inputs (cloned), whether its parameters and inputs required gradients and whether its output did;
3. replays each recorded iteration's calls alone, under the trainer's autocast: a call whose output required
   gradients runs forward + backward (its parameters and inputs requiring gradients as they did), the others
   forward under no_grad. The median over `repeats` replays is the iteration's network time.
(A method whose phases do not all run every iteration, DMD2, is timed and recorded over whole cycles.)

ratio = median iteration time / median network time of a recorded iteration. The rest is the optimizer steps, EMA
updates, loss arithmetic, data, host syncs and Python. Note that the replay runs each trained call's backward on
its own output (a sum), so backward passes that the real loss shares between networks are counted per network.
"""

from __future__ import annotations

import statistics
import time

import torch


def median_time(fn, repeats: int, warmup: int = 2, sync=None) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` ones (`sync()` before each clock read)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_sync(device) -> callable:
    """A function that waits for `device`'s queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _clone(value, grads: list | None = None):
    """A detached copy of a call's argument (tensors, and tuples/lists/dicts of them); `grads` collects whether each
    tensor required gradients."""
    if isinstance(value, torch.Tensor):
        if grads is not None:
            grads.append(value.requires_grad)
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v, grads) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v, grads) for k, v in value.items()}
    return value


def _with_grads(value, grads):
    """Set requires_grad on the (floating-point) tensors of a cloned argument from the iterator `grads`."""
    if isinstance(value, torch.Tensor):
        flag = next(grads)
        return value.requires_grad_(flag) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_with_grads(v, grads) for v in value)
    if isinstance(value, dict):
        return {k: _with_grads(v, grads) for k, v in value.items()}
    return value


def _rows(args) -> int:
    return int(args[0].shape[0]) if args and isinstance(args[0], torch.Tensor) and args[0].ndim else 1


class _RecordedJVP:
    """Stands in for a method's JVP object (sCM, rCM: `method.jvp`): records each call (a forward-mode pass through
    the student, counted as one call of role "jvp") and keeps the network hooks quiet inside it."""

    def __init__(self, inner, recorder):
        self.inner, self.recorder = inner, recorder

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, fn, primals, tangents, **kw):
        rec = self.recorder
        if rec.on:
            rec.iterations[-1].append({"role": "jvp", "jvp": self.inner, "fn": fn, "primals": _clone(tuple(primals)),
                                       "tangents": _clone(tuple(tangents)), "kwargs": kw, "rows": _rows(primals),
                                       "backward": False})
        rec.quiet += 1
        try:
            return self.inner(fn, primals, tangents, **kw)
        finally:
            rec.quiet -= 1


class CallRecorder:
    """Forward hooks on every role's network (`role.module.net`): what each training iteration calls, with which
    inputs. `iterations` is a list of iterations (call `new_iteration()` before each), each a list of calls. A
    method's JVP object (`method.jvp`, sCM/rCM) is wrapped so that each JVP counts as one call, replayed as a JVP."""

    def __init__(self, roles, method=None):
        from fewstep.models.jvp import JVP

        self.iterations: list[list[dict]] = []
        self.handles, self.on, self.quiet = [], False, 0
        for name, role in roles.items():
            net = getattr(role.module, "net", role.module)  # a Denoiser's network, or a bare module (a GAN head)
            self.handles.append(net.register_forward_hook(self._hook(name, net), with_kwargs=True))
        self.method = method if isinstance(getattr(method, "jvp", None), JVP) else None
        if self.method is not None:
            self.method.jvp = _RecordedJVP(self.method.jvp, self)

    def new_iteration(self) -> None:
        self.iterations.append([])

    def _hook(self, name, net):
        def hook(module, args, kwargs, output):
            if not self.on or self.quiet:
                return
            grads: list[bool] = []
            a = _clone(args, grads)
            kw = _clone(kwargs, grads)
            out = output if isinstance(output, torch.Tensor) else None
            self.iterations[-1].append({
                "role": name, "net": net, "args": a, "kwargs": kw, "input_grads": grads, "rows": _rows(args),
                "param_grads": [p.requires_grad for p in net.parameters()],
                "backward": bool(torch.is_grad_enabled() and out is not None and out.requires_grad)})
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        if self.method is not None:
            self.method.jvp = self.method.jvp.inner


def replay(calls: list[dict], autocast=None) -> None:
    """Run recorded calls alone, in order: forward + backward of the output's sum where the real call's output
    required gradients (parameters and inputs requiring them as they did), else a forward under no_grad."""
    import contextlib

    ctx = autocast or contextlib.nullcontext
    for c in calls:
        if "jvp" in c:
            with torch.no_grad(), ctx():
                c["jvp"](c["fn"], c["primals"], c["tangents"], **c["kwargs"])
            continue
        net = c["net"]
        if c["backward"]:
            params = list(net.parameters())
            before = [p.requires_grad for p in params]
            for p, flag in zip(params, c["param_grads"], strict=True):
                p.requires_grad_(flag)
            grads = iter(c["input_grads"])
            args = _with_grads(c["args"], grads)
            kw = _with_grads(c["kwargs"], grads)
            with ctx():
                out = net(*args, **kw)
            out.float().sum().backward()
            for p, flag in zip(params, before, strict=True):
                p.grad = None
                p.requires_grad_(flag)
            _with_grads(c["args"], iter([False] * len(c["input_grads"])))  # reusable leaves: no grads kept
            _with_grads(c["kwargs"], iter([False] * len(c["input_grads"])))
        else:
            with torch.no_grad(), ctx():
                net(*c["args"], **c["kwargs"])


def count_calls(calls: list[dict]) -> tuple[dict[str, int], dict[str, int]]:
    """(calls per role, batch rows per role) of one iteration."""
    n: dict[str, int] = {}
    rows: dict[str, int] = {}
    for c in calls:
        n[c["role"]] = n.get(c["role"], 0) + 1
        rows[c["role"]] = rows.get(c["role"], 0) + c["rows"]
    return n, rows


def trainer_breakdown(trainer, *, repeats: int = 5, warmup: int = 2, record: int = 1) -> dict:
    """One iteration of `trainer` (a fewstep.training.Trainer that has not trained yet) against its network calls
    replayed alone; see the module docstring. Methods whose phases run every few iterations (DMD2's generator every
    5th) are measured over whole cycles of that many iterations: `repeats` timed cycles, `record` recorded ones, and
    times are per iteration (a cycle's time / its length)."""
    import math

    period = math.lcm(*(int(ph.every) for ph in trainer.phases))
    sync = device_sync(trainer.device)
    stamps: dict[int, float] = {}
    rec = None
    user_progress = trainer.progress

    def progress(iteration, total, losses):
        sync()
        stamps[iteration] = time.perf_counter()
        if rec is not None and rec.on and len(rec.iterations) < record * period:
            rec.new_iteration()

    start = trainer.iteration
    first = -(-(start + 1 + warmup) // period) * period  # the first timed iteration: a cycle's start
    trainer.progress = progress
    try:
        trainer.cfg.stop_after = first + repeats * period - start
        trainer.train()
        # stamps[i + 1] - stamps[i] is the time of iteration i (0-based; progress gets the iterations done)
        cycles = [stamps[c + period] - stamps[c] for c in range(first, first + repeats * period, period)]
        rec = CallRecorder(trainer.roles, trainer.method)  # hooks only once the timing is done
        rec.on = True
        rec.new_iteration()
        trainer.cfg.stop_after = record * period
        trainer.train()
        rec.on = False
    finally:
        if rec is not None:
            rec.remove()
        trainer.progress = user_progress
    iterations = rec.iterations[:record * period]
    autocast = trainer.accelerator.autocast
    per_iter = [median_time(lambda calls=calls: replay(calls, autocast), repeats, warmup=1, sync=sync)
                for calls in iterations]
    for role in trainer.roles.values():
        role.module.zero_grad(set_to_none=True)
    per_cycle = [sum(per_iter[i:i + period]) for i in range(0, len(per_iter), period)]
    t_step, t_calls = statistics.median(cycles) / period, statistics.median(per_cycle) / period
    n, rows = count_calls([c for it in iterations[:period] for c in it])
    return {"step_ms": t_step * 1e3, "network_calls_ms": t_calls * 1e3, "ratio": t_step / t_calls,
            "cycle": period, "calls": n, "rows": rows, "timed_cycles": len(cycles), "recorded_cycles": record,
            "step_ms_per_cycle": [round(t * 1e3, 3) for t in cycles],
            "calls_ms_per_recorded_iteration": [round(t * 1e3, 3) for t in per_iter]}
