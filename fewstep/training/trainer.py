"""The distillation loop: one loop for every method, on accelerate.

The method supplies networks by role, optimizer settings, phases (which roles a phase trains and how
often it runs) and the loss of each phase; the trainer builds the networks' optimizers and EMAs and runs the
iterations: phases, gradient accumulation, clipping, the learning-rate schedule, EMA updates, the NaN guard,
logging, sample grids, checkpoints on schedule and a clean stop on Ctrl-C. Methods that make their own training
data or train in stages (reflow) get a `prepare` call before each iteration and after the last.

Around it: `run.py` resolves the config and the run directory, `accelerator.py` the devices and processes,
`checkpoint.py` what a checkpoint holds, `report.py` what a finished run writes (`finish_run`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path

import torch

from fewstep.diffusion.processes import to_device
from fewstep.errors import FewstepError
from fewstep.methods import Batch, DistillMethod, RunContext, StepContext, build_method_config, get_method
from fewstep.teachers import load_model
from fewstep.training import checkpoint as ckpt
from fewstep.training.accelerator import make_accelerator
from fewstep.training.config import DistillConfig, student_options, teacher_options
from fewstep.training.ema import ema_decay_at, ema_pairs, ema_update
from fewstep.training.optim import lr_factor, make_optimizer
from fewstep.training.report import save_sample_grid
from fewstep.training.run import SAMPLES, append_log, truncate_log


class TrainingDiverged(FewstepError):
    """A loss became NaN or infinite; the run stopped and its last good checkpoint is intact."""


class Trainer:
    """Build a run from a resolved DistillConfig (or resume one) and train it."""

    def __init__(self, cfg: DistillConfig, *, teacher=None, method: DistillMethod | None = None, resume: bool = False,
                 progress=None, status=None, reloadable_teacher: bool = False):
        self.cfg = cfg
        self.progress = progress
        self.status = status  # status(text): notes from the method's prepare hook (e.g. pair generation)
        self.accelerator = acc = make_accelerator(cfg.device, cfg.mixed_precision)
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        # a teacher handed in by the caller cannot be reloaded by name for the final table (see _cast_frozen)
        self.teacher_given = teacher is not None and not reloadable_teacher
        self.teacher_fp32 = None  # a float copy of a handed-in teacher kept for the final table (see _cast_frozen)
        self.teacher = teacher if teacher is not None else load_model(cfg.teacher, **teacher_options(cfg))
        self.teacher.to(self.device).requires_grad_(False).eval()
        if self.teacher.components is not None:  # text encoders and VAE (text-to-image teachers)
            self.teacher.components.to(self.device)
        self.out = Path(cfg.out)
        # a method built for this teacher by the run's checks (`plan_run`) is used as it is
        if method is None or method.teacher is not self.teacher:
            method = get_method(cfg.method)(self.teacher, build_method_config(cfg.method, cfg.options),
                                            guidance=cfg.guidance)
        self.method = method
        self.method.student_options = student_options(cfg)
        self.phases = self.method.phases()
        self.data_name = cfg.data or self.teacher.meta.get("data")
        self.source = self._data_source()

        torch.manual_seed(cfg.seed)  # identical initialisation of new parameters on every rank
        self.gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.rank + 1)
        self.roles = self.method.networks()
        if "student" not in self.roles or not self.roles["student"].trainable:
            raise FewstepError(f"method {cfg.method!r} must define a trainable 'student' role")
        self.nets, self.opts = {}, {}
        # the parameters each trained role optimises: those the method left requiring grad (a LoRA student
        # trains its adapters only), or all of them when it left none
        self.trained_params: dict[str, list[torch.nn.Parameter]] = {}
        for name, role in self.roles.items():
            if role.trainable:
                if not any(p.requires_grad for p in role.module.parameters()):
                    role.module.requires_grad_(True)
                self.trained_params[name] = [p for p in role.module.parameters() if p.requires_grad]
        self.frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        self.teacher_cast = False
        for name, role in self.roles.items():
            role.module.to(self.device)
            if role.trainable:
                role.module.train()
                opt = make_optimizer(cfg.optimizer, self.trained_params[name], lr=self._base_lr(name),
                                     betas=tuple(role.betas), weight_decay=role.weight_decay)
                self.nets[name], self.opts[name] = acc.prepare(role.module, opt)
            else:
                if not role.ema_of:
                    self._cast_frozen(role.module)
                    self.teacher_cast |= role.module is self.teacher and self.frozen_dtype is not None
                role.module.requires_grad_(False).eval()
                self.nets[name] = role.module
        self.student = self.roles["student"].module  # unwrapped
        self.ema = None
        if cfg.ema != "none":
            self.ema = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.iteration = 0
        self.saved_iteration = -1  # the iteration of the last checkpoint this process took part in
        self.loss_avg: dict[str, float] = {}
        self._ema_cache: dict[str, tuple] = {}  # see _ema_pairs
        self.elapsed = 0.0
        self._saved_method_state = self.method.state_dict()
        if resume:
            self._restore(ckpt.latest_checkpoint(self.out))

    # -- setup ------------------------------------------------------------------------------------
    def _cast_frozen(self, module: torch.nn.Module) -> None:
        """Frozen networks (the teacher) are stored in the run's mixed precision (bf16/fp16) to save memory;
        parameters they share with a trained network (a LoRA student's base weights) are left alone."""
        if self.frozen_dtype is None:
            return
        if module is self.teacher and self.teacher_given and self.teacher_fp32 is None:
            # a teacher handed in by the caller cannot be reloaded: keep its float weights for the final table
            self.teacher_fp32 = copy.deepcopy(module).to("cpu")
        shared = {id(p) for params in self.trained_params.values() for p in params}
        for p in module.parameters():
            if p.is_floating_point() and id(p) not in shared:
                p.data = p.data.to(self.frozen_dtype)
        for b in module.buffers():
            if b.is_floating_point():
                b.data = b.data.to(self.frozen_dtype)

    def _set_phase_grads(self, phase) -> None:
        """Only the roles a phase trains compute parameter gradients: a generator phase that runs through
        the critic (DMD2's GAN term) back-propagates through its activations, not into its weights."""
        for name, params in self.trained_params.items():
            flag = name in phase.trains
            for p in params:
                p.requires_grad_(flag)

    def _base_lr(self, role: str) -> float:
        return float(self.cfg.lr) * float(self.roles[role].lr_scale)

    def _data_source(self):
        from fewstep.data import get_data

        needs = self.method.needs_data
        if self.teacher.cond_kind == "text":  # prompts (and image-caption pairs): conditions cached on disk
            from fewstep.data.prompts import text_condition_source

            return text_condition_source(self.teacher.components, prompts=self.cfg.prompts, data=self.cfg.data,
                                         need_images=needs, cache_dir=self.out / "cache", method=self.cfg.method)
        if not needs and self.teacher.cond_kind != "class":
            return None
        if self.data_name is None:
            if needs:
                raise FewstepError(f"method {self.cfg.method!r} trains on real data: pass --data NAME|FOLDER "
                                   "(the teacher does not say what it was trained on)")
            return None
        src = get_data(self.data_name)
        if self.teacher.data_shape is not None and tuple(src.shape) != tuple(self.teacher.data_shape):
            raise FewstepError(f"--data {self.data_name!r} has shape {tuple(src.shape)}, the teacher "
                               f"{tuple(self.teacher.data_shape)}")
        return src

    def _batch(self) -> Batch:
        b = int(self.cfg.batch_size)
        if getattr(self.source, "yields_conditions", False):  # a source of (x0 or None, conditions)
            x0, cond = self.source.sample(b, self.gen)
            return Batch(size=b, cond=_to_device(cond, self.device),
                         x0=to_device(x0, self.device) if x0 is not None else None)
        x0 = labels = None
        if self.source is not None:
            x0, labels = self.source.sample(b, self.gen)
            if not self.method.needs_data:
                x0 = None
        if self.teacher.cond_kind == "class" and labels is None:
            labels = torch.randint(0, int(self.teacher.num_classes), (b,), generator=self.gen)
        return Batch(size=b, cond=to_device(labels, self.device) if labels is not None else None,
                     x0=to_device(x0, self.device) if x0 is not None else None)

    def _lr_factor(self, it: int) -> float:
        cfg = self.cfg
        return lr_factor(it, warmup=cfg.warmup, schedule=cfg.lr_schedule, iters=int(cfg.iters))

    # -- training ---------------------------------------------------------------------------------
    def _prepare_method(self, iteration: int) -> None:
        """The method's prepare hook (data it makes itself, stages) before `iteration` (== iters at the end)."""
        self.method.prepare(RunContext(
            out=self.out, iteration=iteration, total=int(self.cfg.iters), device=self.device, rank=self.rank,
            world=self.world, sampling_model=self.sampling_model, barrier=self.accelerator.wait_for_everyone,
            log=self._log, status=self.status or (lambda text: None)))

    def _host_values(self, checked: list[torch.Tensor], values: list[torch.Tensor]) -> tuple[bool, list[float]]:
        """(whether every tensor in `checked` is finite on every rank, the scalars `values` as Python floats), read
        back from the device in one transfer: the only host sync of a phase. Floats are exactly float(v)."""
        dev = self.device
        bad = torch.stack([(~torch.isfinite(v.detach()).all()).to(dev) for v in checked]).sum()
        bad = bad.reshape(1).to(torch.float64)
        if self.world > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        vals = [v.detach().reshape(()).to(dev, torch.float64) for v in values]
        host = torch.cat([bad, torch.stack(vals)] if vals else [bad]).tolist()
        return host[0] == 0.0, host[1:]

    def _diverged(self, phase: str, losses: dict, it: int):
        last = ckpt.latest_checkpoint(self.out)
        bad = {k: float(v.detach().float().item()) for k, v in losses.items()}
        self._log({"iteration": it + 1, "event": "diverged", "phase": phase, "losses": bad})
        where = f"last good checkpoint: {last}" if last else "no checkpoint was saved yet"
        raise TrainingDiverged(f"the {phase} phase became non-finite ({bad}) at iteration {it + 1}; stopped. "
                               f"{where} (resume with --resume --out {self.out} after lowering --lr or --grad-clip)")

    def _phase_step(self, phase, it: int) -> dict[str, float]:
        """One phase: its micro-steps' losses and backward passes, the gradient norms, then (all finite) the
        optimizer steps and EMA updates. The losses and norms reach the host once, after the backward passes and
        before any optimizer step (a non-finite loss makes non-finite gradients, which never reach a step)."""
        acc, cfg = self.accelerator, self.cfg
        for opt in self.opts.values():  # grads a phase leaves on networks it does not train are dropped
            opt.zero_grad(set_to_none=True)
        self._set_phase_grads(phase)
        micro_losses: list[dict[str, torch.Tensor]] = []
        # networks the phase trains are called through their DDP wrappers; the others directly (a DDP
        # module whose forward ran but that gets no backward would fail the next reduction)
        nets = {name: (self.nets[name] if name in phase.trains else role.module) for name, role in self.roles.items()}
        for micro in range(cfg.grad_accum):
            ctx = StepContext(iteration=it, generator=self.gen, device=self.device)
            last = micro == cfg.grad_accum - 1
            with contextlib.ExitStack() as stack:
                if not last and self.world > 1:
                    for r in phase.trains:
                        stack.enter_context(acc.no_sync(self.nets[r]))
                with acc.autocast():
                    losses = self.method.loss(phase.name, self._batch(), nets, ctx)
                acc.backward(losses["loss"] / cfg.grad_accum)
            micro_losses.append({k: v.detach() for k, v in losses.items()})
        norms = {}
        for r in phase.trains:  # the norm is checked even without clipping: inf/nan gradients never reach a step
            norms[r] = acc.clip_grad_norm_(self.nets[r].parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        norms = {r: torch.as_tensor(n) for r, n in norms.items()}
        ok, host = self._host_values([m["loss"] for m in micro_losses] + list(norms.values()),
                                     [v for m in micro_losses for v in m.values()] + list(norms.values()))
        if not ok:
            # the first micro-step whose loss is not finite, else the gradient norms (what the check used to stop on)
            bad = next((m for m in micro_losses if not bool(torch.isfinite(m["loss"]).all())), None)
            if bad is not None:
                self._diverged(phase.name, bad, it)
            self._diverged(phase.name, {f"grad_norm_{r}": n for r, n in norms.items()}, it)
        values = iter(host)
        totals: dict[str, float] = {}
        for m in micro_losses:
            for k in m:
                totals[f"{phase.name}/{k}"] = totals.get(f"{phase.name}/{k}", 0.0) + next(values) / cfg.grad_accum
        for r in phase.trains:
            self.opts[r].step()
            self.opts[r].zero_grad(set_to_none=True)
            totals[f"{phase.name}/grad_norm_{r}"] = next(values)
        for name, role in self.roles.items():
            if role.ema_of in phase.trains:
                ema_update(role.module, self.roles[role.ema_of].module, role.ema_decay, pairs=self._ema_pairs(name))
        return totals

    def _ema_pairs(self, name: str):
        """The (EMA, model) parameter and buffer lists of an EMA (a role's name, or "ema" for the student's), built
        once per `train` call (see `ema_pairs`) instead of walking both module trees every update."""
        if name not in self._ema_cache:
            ema, model = ((self.ema, self.student) if name == "ema" else
                          (self.roles[name].module, self.roles[self.roles[name].ema_of].module))
            self._ema_cache[name] = ema_pairs(ema, model)
        return self._ema_cache[name]

    @contextlib.contextmanager
    def _stop_on_signal(self):
        """Ctrl-C (SIGINT) or SIGTERM during training: finish the iteration, checkpoint, stop cleanly.
        A second signal aborts at once."""
        import signal
        import threading

        self._stop_requested = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True

        old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in old:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def _should_stop(self) -> bool:
        if self.world == 1:  # no device round trip for a single process
            return self._stop_requested
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.device)
        flag = self.accelerator.reduce(flag, reduction="sum")  # every rank stops after the same iteration
        return bool(flag.item() > 0)

    def train(self) -> dict:
        with self._stop_on_signal():
            return self._train()

    def _prepare_source(self) -> None:
        """Caches of a conditions source (text embeddings, latents): the main process computes them first."""
        if hasattr(self.source, "prepare"):
            acc = self.accelerator
            if acc.is_main_process:
                self.source.prepare(compute=True)
            acc.wait_for_everyone()
            if not acc.is_main_process:
                self.source.prepare(compute=False)
            parts = self.teacher.components
            if parts is not None and hasattr(parts, "offload_text_encoders"):
                parts.offload_text_encoders()  # conditions are cached: the encoders leave the accelerator

    def grid_cond(self):
        return self.source.grid_conditions(16) if getattr(self.source, "yields_conditions", False) else None

    def _train(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        self._ema_cache: dict[str, tuple] = {}
        self._prepare_source()
        total = int(cfg.iters)
        stop_at = total if cfg.stop_after is None else min(total, self.iteration + cfg.stop_after)
        t_start = time.perf_counter()
        it_start = self.iteration
        interrupted = False
        while self.iteration < stop_at:
            it = self.iteration
            self._prepare_method(it)
            factor = self._lr_factor(it)
            for name, opt in self.opts.items():
                for g in opt.param_groups:
                    g["lr"] = self._base_lr(name) * factor
            step_losses = {}
            for phase in self.phases:
                if it % phase.every == 0:
                    step_losses.update(self._phase_step(phase, it))
            if self.ema is not None:
                ema_update(self.ema, self.student, ema_decay_at(cfg.ema, it + 1, cfg.ema_decay, cfg.ema_gamma),
                           pairs=self._ema_pairs("ema"))
            for k, v in step_losses.items():
                self.loss_avg[k] = v if k not in self.loss_avg else 0.9 * self.loss_avg[k] + 0.1 * v
            self.iteration = it + 1
            now = time.perf_counter()
            if self.progress is not None:
                self.progress(self.iteration, total, dict(self.loss_avg))
            if cfg.log_every and self.iteration % cfg.log_every == 0:
                rate = (self.iteration - it_start) / max(now - t_start, 1e-9)
                self._log({"iteration": self.iteration, "lr": self._base_lr("student") * factor,
                           "losses": {k: round(v, 6) for k, v in step_losses.items()},
                           "losses_avg": {k: round(v, 6) for k, v in self.loss_avg.items()},
                           "it_per_s": round(rate, 3), "elapsed_s": round(self.elapsed + now - t_start, 2)})
            if cfg.sample_every and self.iteration % cfg.sample_every == 0 and acc.is_main_process:
                save_sample_grid(self.sampling_model(), self.out / SAMPLES / f"step_{self.iteration:08d}.png",
                                 cond=self.grid_cond())
            if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                self.elapsed += time.perf_counter() - t_start
                t_start, it_start = time.perf_counter(), self.iteration
                self.save_checkpoint()
            if self._should_stop():
                interrupted = True
                break
        self.elapsed += time.perf_counter() - t_start
        if not interrupted and self.iteration >= total:
            self._prepare_method(total)
        if self.saved_iteration != self.iteration or self.method.state_dict() != self._saved_method_state:
            self.save_checkpoint()
        out = {"iterations": self.iteration, "finished": self.iteration >= total,
               "train_seconds": round(self.elapsed, 2)}
        if interrupted:
            out["interrupted"] = True
            self._log({"iteration": self.iteration, "event": "interrupted"})
        return out

    # -- outputs ----------------------------------------------------------------------------------
    def sampling_model(self):
        """The student used for sampling and evaluation: the EMA when enabled, with the method's sampler meta."""
        model = self.ema if self.ema is not None else self.student
        model.meta.update(self.student_meta())
        return model

    def student_meta(self) -> dict:
        cfg = self.cfg
        return {**self.method.student_meta(), "method": cfg.method, "distilled_from": cfg.teacher,
                "iterations": self.iteration, "data": self.data_name or self.teacher.meta.get("data"),
                "kind": self.teacher.meta.get("kind")}

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            append_log(self.out, record)

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current state (main process; every rank takes part in gathering it)."""
        tensors, meta = ckpt.training_state(self)
        path = None
        if self.accelerator.is_main_process:
            path = ckpt.save_checkpoint(self.out, self.iteration, tensors, meta, keep=self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        self.saved_iteration = self.iteration
        self._saved_method_state = meta["method_state"]
        return path

    def _restore(self, path: Path | None) -> None:
        ckpt.restore_training_state(self, path)
        self.saved_iteration = self.iteration
        self._saved_method_state = self.method.state_dict()
        if self.accelerator.is_main_process:
            truncate_log(self.out, self.iteration)  # lines past the checkpoint will be written again


def _to_device(cond, device):
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: to_device(v, device) for k, v in cond.items()}
    return to_device(cond, device)
