"""Rectified-flow reflow (Liu et al. 2023), k-reflow, 2-RF++ (Lee et al. 2024) and one-step distillation.

Pairs (z, x = ODE_teacher(z)) come from the shared sampler engine with an accurate solver
(`fewstep.sampling.pairs`, stored in RUN/pairs/round_<k>/). A student initialised from the teacher learns the
straight line between them. In the engine's flow coordinates (flow time s = r / (1 + r), x_f = (1 - s) x + s z;
for any process the same state is x_t = alpha(t) x + sigma(t) z at the time t with that SNR), the student's
velocity v = eps_hat - x0_hat = (x_f - D(x_t, t)) / s regresses onto the straight line's z - x (x - z towards
the data):

    loss = w(s) d(v_theta(x_t, t), z - x),   s ~ U[0, 1] or U-shaped (2-RF++),   w = 1 or 1 - s (2-RF++),

d = squared L2 (mean over elements) or pseudo-Huber sqrt(|a - b|^2 + c^2) - c (2-RF++). k-reflow (`rounds`): each
round trains on new pairs made by the previous round's student. One-step distillation (`distill_1step`, Liu et
al. 2023 sec. 2.3) then trains, on the same pairs, the single Euler step from the sampler's first state
z_0 = prior_std(t_0) z to x: d((z_f - D(z_0, t_0)) / s_0, (z_f - x) / s_0) (for a flow: d(v(z, 1), z - x));
`distill_mix` keeps that fraction of each batch on the straight-line loss (a student good at 2-4 steps too).
Straightness (Liu et al. 2023) of the teacher and of the student after each round is logged and reported.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fewstep.diffusion.processes import RectifiedFlow, convert_time
from fewstep.diffusion.timesteps import SPACINGS, sample_timesteps
from fewstep.errors import FewstepError, check_choice
from fewstep.methods.base import DistillMethod, MethodConfig, Phase, Role, RunContext
from fewstep.methods.registry import register_method
from fewstep.sampling.pairs import (
    MANIFEST,
    PairSet,
    generate_pairs,
    load_pairs,
    model_fingerprint,
    open_pairs,
    pairs_complete,
)
from fewstep.sampling.solvers import ODE_SOLVERS, flow_scale, flow_time, resolve_timesteps

TIME_DISTS = ("uniform", "u_shaped")
LOSSES = ("l2", "huber")
WEIGHTS = ("none", "one_minus_t")
PAIRS_DIR = "pairs"
_FLOW = RectifiedFlow()


@dataclass
class ReflowConfig(MethodConfig):
    rounds: int = 1  # k-reflow: reflow rounds; round k > 1 trains on pairs made by round k - 1's student
    distill_1step: bool = False  # then distill the last round's flow into one step on the same pairs
    distill_share: float = 0.3  # fraction of --iters spent on the one-step distillation (the rounds share the rest)
    distill_mix: float = 0.0  # fraction of each distillation batch that keeps training the straight line
    pairs: str | None = None  # round 1 trains on this pair set (`fewstep pairs`) instead of making one in RUN/pairs/
    pair_num: int = 20000  # pairs per round
    pair_steps: int = 50  # solver steps of the model that makes the pairs
    pair_solver: str = "heun"  # euler | heun | dpm++2m
    pair_spacing: str = "uniform"
    pair_seed: int = 0  # round k uses pair_seed + k - 1
    pair_shard_size: int = 4096
    pair_batch_size: int = 1024
    time_dist: str = "u_shaped"  # uniform (Liu et al.) | u_shaped (2-RF++: density ~ cosh(a (s - 1/2)))
    u_shape_a: float = 4.0
    s_min: float = 1e-3  # smallest training flow time (the velocity is (x_f - x0) / s)
    loss: str = "huber"  # l2 | huber (pseudo-Huber over the sample, 2-RF++)
    huber_c: float | None = None  # None: 0.00054 sqrt(data dim) (Song & Dhariwal 2023)
    loss_weight: str = "none"  # none | one_minus_t (2-RF++'s (1 - t) weight)
    sample_steps: int = 2  # the saved flow's default Euler steps (a distilled student: 1)
    straightness_num: int = 512  # paths per straightness measurement
    straightness_steps: int = 32  # Euler steps along each path


@register_method("reflow")
class Reflow(DistillMethod):
    config_class = ReflowConfig
    needs_data = False
    description = "rectified-flow reflow on teacher pairs (Liu et al. 2023; 2-RF++), k rounds, optional 1-step distill"
    recipes = {
        "2d": {"iters": 1000, "batch_size": 256, "lr": 1e-3, "ema_decay": 0.995, "options": {"pair_num": 20000}},
        "image": {"iters": 1000, "batch_size": 128, "lr": 5e-4, "ema_decay": 0.999,
                  "options": {"pair_num": 10000, "pair_steps": 32}},
    }

    def __init__(self, teacher, config=None, *, guidance: float = 1.0):
        super().__init__(teacher, config, guidance=guidance)
        c = self.config
        need = _check
        need(isinstance(c.rounds, int) and c.rounds >= 1, f"rounds must be an integer >= 1, got {c.rounds!r}")
        need(isinstance(c.distill_1step, bool), f"distill_1step must be true or false, got {c.distill_1step!r}")
        need(0 < c.distill_share < 1, f"distill_share must be in (0, 1), got {c.distill_share!r}")
        need(0 <= c.distill_mix < 1, f"distill_mix must be in [0, 1), got {c.distill_mix!r}")
        for name in ("pair_num", "pair_steps", "pair_shard_size", "pair_batch_size", "sample_steps",
                     "straightness_num", "straightness_steps"):
            v = getattr(c, name)
            need(isinstance(v, int) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        check_choice("pair_solver", c.pair_solver, ODE_SOLVERS)
        check_choice("pair_spacing", c.pair_spacing, SPACINGS)
        check_choice("time_dist", c.time_dist, TIME_DISTS)
        check_choice("loss", c.loss, LOSSES)
        check_choice("loss_weight", c.loss_weight, WEIGHTS)
        need(0 < c.s_min < 0.5, f"s_min must be in (0, 0.5), got {c.s_min!r}")
        need(c.u_shape_a > 0, f"u_shape_a must be > 0, got {c.u_shape_a!r}")
        need(c.huber_c is None or c.huber_c > 0, f"huber_c must be > 0, got {c.huber_c!r}")
        if c.pairs is not None:
            self._check_given_manifest(c.pairs)
        if teacher.cond_kind not in ("none", "class"):
            raise FewstepError(f"reflow needs an unconditional or class-conditional teacher, not {teacher.cond_kind!r}")
        proc = teacher.process
        dim = math.prod(teacher.data_shape or (1,))
        self.huber_c = c.huber_c if c.huber_c is not None else 0.00054 * math.sqrt(dim)
        # the flow times the process can represent, and the sampler's first time (where one step starts)
        self.s_hi = float(flow_time(proc, torch.tensor(proc.t_max, dtype=torch.float64)))
        self.s_lo = max(float(c.s_min), float(flow_time(proc, torch.tensor(proc.t_min, dtype=torch.float64))))
        self.t_start = resolve_timesteps(proc, 1)  # (1,) float64
        self.s_start = float(flow_time(proc, self.t_start))
        self.start_scale = float(proc.prior_std(self.t_start)) / float(flow_scale(proc, self.t_start))
        # progress (checkpointed): the stage plan, stages begun, straightness records
        self.plan: list[dict] | None = None
        self.begun: list[int] = []
        self.records: list[dict] = []
        # in memory only
        self.stage: dict | None = None
        self.pairs: PairSet | None = None
        self._loaded = None

    # -- networks -------------------------------------------------------------------------------
    def networks(self) -> dict[str, Role]:
        return {"teacher": Role(self.teacher), "student": Role(self.student_from_teacher(), trainable=True)}

    def phases(self) -> list[Phase]:
        return [Phase("student", ("student",))]

    # -- stages ---------------------------------------------------------------------------------
    def make_plan(self, total: int) -> list[dict]:
        """Stages as {"kind": "reflow"|"distill", "round": k, "start": first iteration}: the rounds share the
        iterations left after the distillation's share, equally (the last takes the remainder)."""
        c = self.config
        distill = int(round(total * c.distill_share)) if c.distill_1step else 0
        per = (total - distill) // c.rounds
        if per < 1 or (c.distill_1step and distill < 1):
            extra = f", distill_1step with distill_share={c.distill_share}" if c.distill_1step else ""
            raise FewstepError(f"--iters {total} leaves a reflow stage without iterations (rounds={c.rounds}{extra}); "
                               "use more iterations")
        plan = [{"kind": "reflow", "round": k + 1, "start": k * per} for k in range(c.rounds)]
        if c.distill_1step:
            plan.append({"kind": "distill", "round": c.rounds, "start": total - distill})
        return plan

    def _stage_index(self, iteration: int) -> int:
        return max(i for i, st in enumerate(self.plan) if st["start"] <= iteration)

    def prepare(self, run: RunContext) -> None:
        if self.plan is None:
            self.plan = self.make_plan(run.total)
        if run.iteration >= run.total:
            self._finish(run)
            return
        k = self._stage_index(run.iteration)
        if self._loaded == k:
            return
        stage = self.plan[k]
        if k not in self.begun:  # the stage starts now (not a resume into it)
            self._measure(run, k, self.teacher if k == 0 else run.sampling_model(),
                          "teacher" if k == 0 else _after(self.plan[k - 1]))
            if k > 0 and run.is_main:  # keep the flow the previous round ended with
                self._save_round(run, self.plan[k - 1])
        self.stage = stage
        self.pairs = self._stage_pairs(run, k)
        if k not in self.begun:
            self.begun.append(k)
        self._loaded = k

    def _finish(self, run: RunContext) -> None:
        self.stage = self.plan[-1]
        if any(r.get("final") and r["iteration"] == run.iteration for r in self.records):
            return
        for r in self.records:  # a finished run continued with more --iters: its old end is no longer final
            if r.get("final"):
                r["final"] = False
                r["stage"] = f"end at {r['iteration']}"
        self._measure(run, "final", run.sampling_model(), _after(self.plan[-1]), final=True)

    def _measure(self, run: RunContext, stage_index, model, after: str, final: bool = False) -> None:
        from fewstep.eval.straightness import straightness

        c = self.config
        if any(r["stage"] == stage_index for r in self.records):
            return
        value = None
        if run.is_main:
            run.status(f"straightness of {after}")
            guidance = self.guidance if model is self.teacher else 1.0  # students learnt the guided pairs
            value = straightness(model, c.straightness_num, steps=c.straightness_steps, guidance=guidance,
                                 batch_size=c.pair_batch_size)
        rec = {"after": after, "stage": stage_index, "iteration": run.iteration, "value": value,
               "num": c.straightness_num, "steps": c.straightness_steps, "solver": "euler"}
        if final:
            rec["final"] = True
        self.records.append(rec)
        # logged as part of the iteration it precedes (a resume from the checkpoint before it logs it again)
        run.log({"iteration": run.iteration + (0 if final else 1), "event": "straightness",
                 **{k: v for k, v in rec.items() if k != "iteration"}})

    def _save_round(self, run: RunContext, stage: dict) -> None:
        """RUN/round_<k>/: the flow round k ended with (a model directory, Euler at `sample_steps` by default)."""
        from fewstep.models.io import save_denoiser

        model = run.sampling_model()
        saved = dict(model.meta)
        model.meta.update(self._flow_meta())
        try:
            save_denoiser(model, Path(run.out) / f"round_{stage['round']}")
        finally:
            model.meta.clear()
            model.meta.update(saved)

    # -- pairs ----------------------------------------------------------------------------------
    def _stage_pairs(self, run: RunContext, k: int) -> PairSet:
        stage = self.plan[k]
        r = stage["round"]
        if stage["kind"] == "distill":  # the last round's pairs
            k = max(i for i, st in enumerate(self.plan) if st["kind"] == "reflow" and st["round"] == r)
        if r == 1 and self.config.pairs is not None:
            return load_pairs(self.config.pairs)
        out = Path(run.out) / PAIRS_DIR / f"round_{r}"
        if k in self.begun and pairs_complete(out):
            return load_pairs(out)
        if k in self.begun and r > 1:
            raise FewstepError(f"the pairs of round {r} in {str(out)!r} are incomplete and the model that made them "
                               "is gone (it was the student at the start of the round); start a new run")
        model = self.teacher if r == 1 else run.sampling_model()
        self._make_pairs(run, model, out, r)
        return load_pairs(out)

    def _pair_args(self, r: int) -> dict:
        c = self.config
        return {"num": c.pair_num, "steps": c.pair_steps, "solver": c.pair_solver, "spacing": c.pair_spacing,
                "seed": c.pair_seed + r - 1, "guidance": self.guidance if r == 1 else 1.0,
                "shard_size": c.pair_shard_size, "batch_size": c.pair_batch_size}

    def _make_pairs(self, run: RunContext, model, out: Path, r: int) -> None:
        """Every rank makes its share of the shards (worker = rank), then all wait."""
        args = self._pair_args(r)
        num = args.pop("num")
        spec = "teacher" if r == 1 else f"reflow round {r - 1} student"
        if run.is_main:
            try:
                open_pairs(model, out, num, **args, teacher_spec=spec)
            except FewstepError:
                # run-internal pairs made with other settings, or by a model that came out differently: start over
                shutil.rmtree(out)
                open_pairs(model, out, num, **args, teacher_spec=spec)
        run.barrier()
        done = [0]

        def progress(n):
            done[0] += n
            run.status(f"pairs round {r}: {done[0] * run.world}/{num}")

        res = generate_pairs(model, out, num, **args, progress=progress, teacher_spec=spec,
                             worker=run.rank, workers=run.world)
        run.barrier()
        if res["pairs_made"]:
            run.log({"iteration": run.iteration + 1, "event": "pairs", "round": r, "out": str(out),
                     "pairs_made": res["pairs_made"], "seconds": res["seconds"],
                     "pairs_per_second": res["pairs_per_second"]})

    def _check_given_manifest(self, path: str) -> None:
        """A given pair set must be this teacher's (checked from its manifest, before the run starts)."""
        if not (Path(path) / MANIFEST).is_file():
            raise FewstepError(f"pairs {path!r} is not a pair set ({MANIFEST} not found; make one with "
                               "`fewstep pairs`)")
        try:
            m = json.loads((Path(path) / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise FewstepError(f"cannot read {str(Path(path) / MANIFEST)!r}: {e}") from None
        t = self.teacher
        if tuple(m.get("data_shape") or ()) != tuple(t.data_shape or ()):
            raise FewstepError(f"pairs {path!r} hold data of shape {tuple(m.get('data_shape') or ())}, the teacher "
                               f"{tuple(t.data_shape or ())}")
        if m.get("teacher_sha256") != model_fingerprint(t):
            raise FewstepError(f"pairs {path!r} were made by another model ({m.get('teacher')!r}), not this teacher")

    # -- loss -----------------------------------------------------------------------------------
    def sample_flow_times(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Training flow times in [s_lo, s_hi]: uniform, or 2-RF++'s U-shape p(u) ~ cosh(a (u - 1/2)) on [0, 1]
        mapped onto that interval."""
        c = self.config
        if c.time_dist == "u_shaped":
            u = sample_timesteps(n, _FLOW, "u_shaped", generator=generator, a=c.u_shape_a)
        else:
            u = torch.rand(n, generator=generator, dtype=torch.float64)
        return self.s_lo + (self.s_hi - self.s_lo) * u

    def distance(self, diff: torch.Tensor) -> torch.Tensor:
        """Per-sample d from diff (B, D): mean square, or pseudo-Huber sqrt(|d|^2 + c^2) - c (Lee et al. 2024)."""
        if self.config.loss == "l2":
            return diff.pow(2).mean(1)
        return torch.sqrt(diff.pow(2).sum(1) + self.huber_c ** 2) - self.huber_c

    def loss(self, phase, batch, nets, ctx):
        if self.pairs is None:
            raise FewstepError("reflow has no pairs loaded: the trainer calls prepare() before the first iteration")
        z, x, cond = self.pairs.sample(batch.size, ctx.generator)
        dev = ctx.device
        z, x = z.to(dev, torch.float32), x.to(dev, torch.float32)
        cond = cond.to(dev) if cond is not None else None
        proc = self.teacher.process
        n = batch.size
        shape = (-1,) + (1,) * (x.ndim - 1)
        distill = self.stage is not None and self.stage["kind"] == "distill"
        # rows 0..m-1 train the straight line at random times; in the distillation stage the other rows train
        # the sampler's one Euler step, from x_f = prior_std(t_0) z / c(t_0) at s_0 to D(., t_0)
        m = int(round(n * self.config.distill_mix)) if distill else n
        s_raw = self.sample_flow_times(m, ctx.generator)
        t_line = convert_time(s_raw, _FLOW, proc)
        t = torch.cat([t_line, self.t_start.expand(n - m)])
        s = torch.cat([flow_time(proc, t_line), torch.full((n - m,), self.s_start, dtype=torch.float64)])
        s_col = s.to(dev, torch.float32).reshape(shape)
        one_step = (torch.arange(n, device=dev) >= m).reshape(shape)
        x_f = torch.where(one_step, z * self.start_scale, (1.0 - s_col) * x + s_col * z)
        target = torch.where(one_step, (x_f - x) / self.s_start, z - x)
        weight = None
        if self.config.loss_weight == "one_minus_t":
            weight = torch.where(one_step.flatten(), 1.0, 1.0 - s.to(dev, torch.float32))
        c = flow_scale(proc, t).to(dev, torch.float32).reshape(shape)
        x_t = c * x_f  # = alpha(t) x + sigma(t) z
        x0 = nets["student"](x_t, t.to(dev, torch.float32), cond, 1.0)
        v = (x_f - x0.float()) / s_col  # eps_hat - x0_hat
        diff = (v - target).flatten(1)
        per = self.distance(diff)
        loss = (per * weight).mean() if weight is not None else per.mean()
        return {"loss": loss, "mse": diff.pow(2).mean().detach()}

    # -- state, outputs -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"plan": self.plan, "begun": list(self.begun), "records": [dict(r) for r in self.records]}

    def load_state_dict(self, state: dict) -> None:
        self.plan = state.get("plan")
        self.begun = list(state.get("begun") or [])
        self.records = [dict(r) for r in state.get("records") or []]
        self._loaded, self.pairs, self.stage = None, None, None

    def metrics(self) -> dict:
        return {"straightness": [dict(r) for r in self.records if r.get("value") is not None]}

    def _flow_meta(self) -> dict:
        return {"default_solver": "euler", "default_steps": self.config.sample_steps}

    def student_meta(self) -> dict:
        c = self.config
        meta = {"reflow": {"rounds": c.rounds, "distill_1step": c.distill_1step}}
        if self.stage is not None and self.stage["kind"] == "distill":
            return {**meta, "default_solver": "euler", "default_steps": 1}
        return {**meta, **self._flow_meta()}


def _after(stage: dict) -> str:
    return f"round {stage['round']}" if stage["kind"] == "reflow" else "1-step distillation"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise FewstepError(msg)


__all__ = ["Reflow", "ReflowConfig"]
