"""The distillation trainer: one loop for every method, on accelerate.

The method supplies networks by role, optimizer settings, phases (which roles a phase trains and how
often it runs) and the loss of each phase; the trainer owns devices, mixed precision, DDP/FSDP
wrapping, gradient accumulation, clipping, LR warm-up, EMAs, seeds, logging, sample grids,
checkpoints (atomic; `resume` continues the latest bit-exactly on CPU), the NaN guard and the final
quality table. Methods that make their own training data or train in stages (reflow) get a `prepare`
call before each iteration and after the last, and their `state_dict` rides in every checkpoint.
A run directory holds config.yaml, log.jsonl, metrics.json, samples/*.png, student/ (the weights to
sample with: the EMA when enabled) and checkpoints/.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import re
import time
from datetime import datetime
from pathlib import Path

import torch

from fewstep.errors import FewstepError
from fewstep.fileio import atomic_write
from fewstep.methods.base import Batch, RunContext, StepContext, build_method_config, get_method
from fewstep.training import checkpoint as ckpt
from fewstep.training.config import DistillConfig, make_config, resolve
from fewstep.training.ema import ema_decay_at, ema_update
from fewstep.training.report import DEFAULT_EVAL_NUM, data_kind, quality_table, save_sample_grid, table_text

CONFIG_YAML = "config.yaml"
LOG = "log.jsonl"
METRICS = "metrics.json"
STUDENT = "student"
STUDENT_ONLINE = "student_online"
SAMPLES = "samples"
# fields that may differ when a run is resumed (they do not change what is trained)
RESUME_OVERRIDABLE = {"iters", "stop_after", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
                      "eval", "eval_num", "eval_steps", "device", "out"}


class TrainingDiverged(FewstepError):
    """A loss became NaN or infinite; the run stopped and its last good checkpoint is intact."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(text)).name if "/" in str(text) else str(text)).strip("_")


def default_run_dir(method: str, teacher: str) -> Path:
    return Path("runs") / f"{method}-{_slug(teacher)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _write_yaml(path: Path, data: dict) -> None:
    import yaml

    atomic_write(path, lambda tmp: Path(tmp).write_text(yaml.safe_dump(data, sort_keys=False)))


def destroy_process_group() -> None:
    """Tear down torch.distributed's default process group if one is up (a no-op otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


_exit_hook_registered = False


def _destroy_process_group_at_exit() -> None:
    """Register (once) destroy_process_group to run at exit, while the interpreter is still alive: a process
    that exits with its gloo group up can abort at finalization ("terminate called without an active
    exception", SIGABRT), failing a finished run."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        import atexit

        atexit.register(destroy_process_group)
        _exit_hook_registered = True


def _make_accelerator(cfg: DistillConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FewstepError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    # a second run in the same process may ask for another device or precision: start accelerate afresh
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=(PartialState().device.type == "cpu") != cpu)
    acc = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision)
    if acc.num_processes > 1:
        _destroy_process_group_at_exit()
    if acc.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        # checkpoints and EMAs read the unsharded modules: only replicated (DDP) training is supported so far
        raise FewstepError(f"accelerate is configured for {acc.distributed_type.name}; fewstep distill supports "
                           "single-process and DDP (multi-GPU or multi-CPU) runs for now")
    if (acc.device.type == "cpu") != cpu:
        raise FewstepError(f"accelerate chose {acc.device} but the run asks for {'cpu' if cpu else 'cuda'}")
    return acc


class Trainer:
    """Build a run from a resolved DistillConfig (or resume one) and train it."""

    def __init__(self, cfg: DistillConfig, *, teacher=None, resume: bool = False, progress=None, status=None,
                 reloadable_teacher: bool = False):
        from fewstep.api import load_model

        self.cfg = cfg
        self.progress = progress
        self.status = status  # status(text): notes from the method's prepare hook (e.g. pair generation)
        self.accelerator = acc = _make_accelerator(cfg)
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        # a teacher handed in by the caller cannot be reloaded by name for the final table (see _cast_frozen)
        self.teacher_given = teacher is not None and not reloadable_teacher
        self.teacher = teacher if teacher is not None else load_model(cfg.teacher, **teacher_options(cfg))
        self.teacher.to(self.device).requires_grad_(False).eval()
        if self.teacher.components is not None:  # text encoders and VAE (text-to-image teachers)
            self.teacher.components.to(self.device)
        self.out = Path(cfg.out)
        self.method = get_method(cfg.method)(self.teacher, build_method_config(cfg.method, cfg.options),
                                             guidance=cfg.guidance)
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
        self.elapsed = 0.0
        self._saved_method_state = self.method.state_dict()
        if resume:
            self._load(ckpt.latest_checkpoint(self.out))

    # -- setup ------------------------------------------------------------------------------------
    def _cast_frozen(self, module: torch.nn.Module) -> None:
        """Frozen networks (the teacher) are stored in the run's mixed precision (bf16/fp16) to save memory;
        parameters they share with a trained network (a LoRA student's base weights) are left alone."""
        if self.frozen_dtype is None:
            return
        if module is self.teacher and self.teacher_given and not hasattr(self, "_teacher_fp32"):
            # a teacher handed in by the caller cannot be reloaded: keep its float weights for the final table
            self._teacher_fp32 = copy.deepcopy(module).to("cpu")
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
            return Batch(size=b, cond=_to_device(cond, self.device), x0=x0.to(self.device) if x0 is not None else None)
        x0 = labels = None
        if self.source is not None:
            x0, labels = self.source.sample(b, self.gen)
            if not self.method.needs_data:
                x0 = None
        if self.teacher.cond_kind == "class" and labels is None:
            labels = torch.randint(0, int(self.teacher.num_classes), (b,), generator=self.gen)
        return Batch(size=b, cond=labels.to(self.device) if labels is not None else None,
                     x0=x0.to(self.device) if x0 is not None else None)

    def _lr_factor(self, it: int) -> float:
        cfg = self.cfg
        if cfg.warmup and it < cfg.warmup:
            return (it + 1) / cfg.warmup
        if cfg.lr_schedule == "cosine":
            p = (it - cfg.warmup) / max(1, cfg.iters - cfg.warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
        return 1.0

    # -- training ---------------------------------------------------------------------------------
    def _prepare_method(self, iteration: int) -> None:
        """The method's prepare hook (data it makes itself, stages) before `iteration` (== iters at the end)."""
        self.method.prepare(RunContext(
            out=self.out, iteration=iteration, total=int(self.cfg.iters), device=self.device, rank=self.rank,
            world=self.world, sampling_model=self.sampling_model, barrier=self.accelerator.wait_for_everyone,
            log=self._log, status=self.status or (lambda text: None)))

    def _all_finite(self, value: torch.Tensor) -> bool:
        ok = torch.tensor([1.0 if bool(torch.isfinite(value.detach()).all()) else 0.0], device=self.device)
        if self.world > 1:
            ok = self.accelerator.reduce(ok, reduction="sum") / self.world
        return bool(ok.item() == 1.0)

    def _diverged(self, phase: str, losses: dict, it: int):
        last = ckpt.latest_checkpoint(self.out)
        bad = {k: float(v.detach().float().item()) for k, v in losses.items()}
        self._log({"iteration": it + 1, "event": "diverged", "phase": phase, "losses": bad})
        where = f"last good checkpoint: {last}" if last else "no checkpoint was saved yet"
        raise TrainingDiverged(f"the {phase} phase became non-finite ({bad}) at iteration {it + 1}; stopped. "
                               f"{where} (resume with --resume --out {self.out} after lowering --lr or --grad-clip)")

    def _phase_step(self, phase, it: int) -> dict[str, float]:
        acc, cfg = self.accelerator, self.cfg
        for opt in self.opts.values():  # grads a phase leaves on networks it does not train are dropped
            opt.zero_grad(set_to_none=True)
        self._set_phase_grads(phase)
        totals: dict[str, float] = {}
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
                loss = losses["loss"]
                if not self._all_finite(loss):
                    self._diverged(phase.name, losses, it)
                acc.backward(loss / cfg.grad_accum)
            for k, v in losses.items():
                totals[f"{phase.name}/{k}"] = totals.get(f"{phase.name}/{k}", 0.0) + float(v.detach()) / cfg.grad_accum
        norms = {}
        for r in phase.trains:  # the norm is checked even without clipping: inf/nan gradients never reach a step
            norms[r] = acc.clip_grad_norm_(self.nets[r].parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not all(self._all_finite(torch.as_tensor(n)) for n in norms.values()):
            self._diverged(phase.name, {f"grad_norm_{r}": torch.as_tensor(n) for r, n in norms.items()}, it)
        for r in phase.trains:
            self.opts[r].step()
            self.opts[r].zero_grad(set_to_none=True)
            totals[f"{phase.name}/grad_norm_{r}"] = float(norms[r])
        for role in self.roles.values():
            if role.ema_of in phase.trains:
                ema_update(role.module, self.roles[role.ema_of].module, role.ema_decay)
        return totals

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
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.device)
        if self.world > 1:  # every rank stops after the same iteration
            flag = self.accelerator.reduce(flag, reduction="sum")
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

    def _grid_cond(self):
        return self.source.grid_conditions(16) if getattr(self.source, "yields_conditions", False) else None

    def _train(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
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
                ema_update(self.ema, self.student, ema_decay_at(cfg.ema, it + 1, cfg.ema_decay, cfg.ema_gamma))
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
                                 cond=self._grid_cond())
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
        model.meta.update(self._student_meta())
        return model

    def _student_meta(self) -> dict:
        cfg = self.cfg
        return {**self.method.student_meta(), "method": cfg.method, "distilled_from": cfg.teacher,
                "iterations": self.iteration, "data": self.data_name or self.teacher.meta.get("data"),
                "kind": self.teacher.meta.get("kind")}

    def _log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        tensors: dict[str, torch.Tensor] = {}
        method_state = self.method.state_dict()
        meta: dict = {"optimizers": {}, "loss_avg": self.loss_avg, "elapsed_s": self.elapsed,
                      "world_size": self.world, "method_state": method_state}
        for name, role in self.roles.items():
            if role.trainable or role.ema_of:
                for k, v in role.module.state_dict().items():
                    tensors[f"net.{name}.{k}"] = v
        if self.ema is not None:
            for k, v in self.ema.state_dict().items():
                tensors[f"ema.student.{k}"] = v
        for name, opt in self.opts.items():
            t, m = ckpt.flatten_optimizer(f"opt.{name}", opt.state_dict())
            tensors.update(t)
            meta["optimizers"][name] = m
        gen_state = self.gen.get_state()
        cpu_state = torch.get_rng_state()
        if self.world > 1:  # every rank's streams, so a resumed multi-process run continues each of them
            gen_state = acc.gather(gen_state.to(self.device)[None]).cpu()
            cpu_state = acc.gather(cpu_state.to(self.device)[None]).cpu()
        else:
            gen_state, cpu_state = gen_state[None], cpu_state[None]
        tensors["rng.generator"], tensors["rng.torch"] = gen_state, cpu_state
        if self.device.type == "cuda":
            cuda_state = torch.cuda.get_rng_state(self.device)
            tensors["rng.cuda"] = (acc.gather(cuda_state.to(self.device)[None]).cpu() if self.world > 1
                                   else cuda_state[None])
        if getattr(acc, "scaler", None) is not None:  # fp16 loss scaling
            meta["scaler"] = acc.scaler.state_dict()
        path = None
        if acc.is_main_process:
            path = ckpt.save_checkpoint(self.out, self.iteration, tensors, meta, keep=self.cfg.keep_checkpoints)
        acc.wait_for_everyone()
        self.saved_iteration = self.iteration
        self._saved_method_state = method_state
        return path

    def _load(self, path: Path | None) -> None:
        if path is None:
            raise FewstepError(f"nothing to resume in {str(self.out)!r}: it has no complete checkpoint")
        tensors, meta = ckpt.load_checkpoint(path)
        if meta.get("world_size", 1) != self.world:
            raise FewstepError(f"{str(path)!r} was written by {meta.get('world_size')} processes; resume it with "
                               f"the same number (this launch has {self.world})")

        def part(prefix):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        for name, role in self.roles.items():
            if role.trainable or role.ema_of:
                saved, own = part(f"net.{name}."), set(role.module.state_dict())
                missing, extra = sorted(own - set(saved)), sorted(set(saved) - own)
                if missing or extra:  # a checkpoint from other options or an older version: say which keys
                    hint = (" (a TDM run from before the step-count input: add `steps_embed: false` under "
                            "options in its config.yaml)" if any("steps_mlp" in k for k in missing) else "")
                    raise FewstepError(f"{str(path)!r} does not fit this run's {name!r} network: missing "
                                       f"{missing[:3]}, unexpected {extra[:3]}; resume with the options it was "
                                       f"written with{hint}")
                role.module.load_state_dict(saved)
        if self.ema is not None:
            self.ema.load_state_dict(part("ema.student."))
        for name, opt in self.opts.items():
            opt.load_state_dict(ckpt.unflatten_optimizer(f"opt.{name}", tensors, meta["optimizers"][name]))
        self.gen.set_state(tensors["rng.generator"][self.rank].clone())
        torch.set_rng_state(tensors["rng.torch"][self.rank].clone())
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"][self.rank].clone(), self.device)
        if meta.get("scaler") and getattr(self.accelerator, "scaler", None) is not None:
            self.accelerator.scaler.load_state_dict(meta["scaler"])
        self.method.load_state_dict(meta.get("method_state") or {})
        self._saved_method_state = self.method.state_dict()
        self.iteration = self.saved_iteration = int(meta["iteration"])
        self.loss_avg = dict(meta.get("loss_avg", {}))
        self.elapsed = float(meta.get("elapsed_s", 0.0))
        self._truncate_log(self.iteration)

    def _truncate_log(self, iteration: int) -> None:
        """Drop log lines past the checkpoint we resume from (they will be written again)."""
        log = self.out / LOG
        if not log.is_file() or not self.accelerator.is_main_process:
            return
        keep = []
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if int(rec.get("iteration", 0)) <= iteration:
                keep.append(line)
        atomic_write(log, lambda tmp: Path(tmp).write_text("".join(s + "\n" for s in keep)))

    def finish(self, progress_eval=None) -> dict:
        """Save the student (and raw online weights), grids for each evaluated step count, the quality table."""
        from fewstep.models.io import save_denoiser

        cfg, acc = self.cfg, self.accelerator
        result: dict = {"run": str(self.out), "method": cfg.method, "teacher": cfg.teacher,
                        "iterations": self.iteration, "train_seconds": round(self.elapsed, 2)}
        if not acc.is_main_process:
            return result
        model = self.sampling_model()
        save_denoiser(model, self.out / STUDENT)
        if self.ema is not None:
            online = self.student
            online.meta.update(self._student_meta())
            save_denoiser(online, self.out / STUDENT_ONLINE)
        eval_steps = tuple(cfg.eval_steps or self.method.eval_steps())
        for steps in eval_steps:
            save_sample_grid(model, self.out / SAMPLES / f"final_{steps}step.png", steps=steps, cond=self._grid_cond())
        result["student"] = str(self.out / STUDENT)
        rows = []
        data = self.data_name or self.teacher.meta.get("data")
        if cfg.eval and data is not None and data_kind(self.teacher) != "text2image":  # no built-in text metric
            num = cfg.eval_num or DEFAULT_EVAL_NUM[data_kind(self.teacher)]
            spec = cfg.teacher if not Path(cfg.teacher).exists() else None
            t0 = time.perf_counter()
            teacher = self.teacher
            if self.teacher_cast:  # the table scores the teacher in full precision, not its bf16 training copy
                from fewstep.api import load_model

                teacher = (self._teacher_fp32 if self.teacher_given
                           else load_model(cfg.teacher, **teacher_options(cfg)))
                teacher.to(self.device).eval()
            rows = quality_table(teacher, model, data, num=num, student_steps=eval_steps,
                                 teacher_spec=spec, guidance=cfg.guidance, progress=progress_eval)
            result["eval_seconds"] = round(time.perf_counter() - t0, 2)
        result["table"] = rows
        for key, value in self.method.metrics().items():  # the method's own numbers (e.g. reflow's straightness)
            result.setdefault(key, value)
        metrics = {k: v for k, v in result.items()}
        atomic_write(self.out / METRICS, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1)))
        if rows:
            self._log({"iteration": self.iteration, "event": "quality", "table": rows})
            result["table_text"] = table_text(rows)
        return result


def prepare_run(values: dict, *, explicit: set[str], resume: bool = False, check_out: bool = True,
                loaded: dict | None = None) -> DistillConfig:
    """Resolve a config dict (defaults < recipe < YAML/flags) and set up the run directory.

    New run: `out` must not exist or be empty; config.yaml is written. Resume: `out` must hold a run;
    its config.yaml is used, with only RESUME_OVERRIDABLE fields taken from `values`. `loaded` (a dict) receives
    the teacher loaded for the checks under "teacher", so the trainer need not load it again.
    """
    from fewstep.api import load_model
    from fewstep.outputs import ensure_new_path

    if resume:
        out = values.get("out")
        if not out:
            raise FewstepError("--resume needs --out RUN_DIR (the run to continue)")
        path = Path(out) / CONFIG_YAML
        if not path.is_file():
            raise FewstepError(f"nothing to resume: {str(path)!r} not found")
        from fewstep.training.config import load_yaml

        saved = load_yaml(path)

        def differs(k):
            if k == "options":  # given options must agree with the saved ones (which include the recipe's)
                return any((saved.get("options") or {}).get(o) != v for o, v in (values.get(k) or {}).items())
            if k == "iters" and saved.get("lr_schedule") == "cosine":
                return values.get(k) != saved.get(k)  # the cosine schedule depends on the length
            return k not in RESUME_OVERRIDABLE and values.get(k) != saved.get(k)

        changed = sorted(k for k in explicit if differs(k))
        if changed:
            raise FewstepError(f"cannot change {', '.join(changed)} when resuming (only "
                               f"{', '.join(sorted(RESUME_OVERRIDABLE - {'out'}))} may change)")
        merged = {**saved, **{k: values[k] for k in explicit if k in RESUME_OVERRIDABLE}}
        merged["out"] = str(out)
        merged["stop_after"] = values.get("stop_after") if "stop_after" in explicit else None  # per invocation
        cfg = make_config(merged)
        ckpt.remove_partial_checkpoints(out)
        return cfg
    cfg = make_config(values)
    teacher = load_model(cfg.teacher, **teacher_options(cfg))
    if loaded is not None:
        loaded["teacher"] = teacher
    cfg = resolve(cfg, data_kind(teacher), explicit)
    for flag, on in (("--lora-rank", cfg.lora_rank), ("--gradient-checkpointing", cfg.gradient_checkpointing)):
        if on and not hasattr(teacher.net, "derive"):
            raise FewstepError(f"{flag} needs a diffusers teacher (sd15, sdxl, sd3, a hub id or pipeline folder), "
                               f"not {cfg.teacher!r}")
    make_optimizer(cfg.optimizer, [torch.zeros(1, requires_grad=True)], lr=1.0)  # bitsandbytes missing: fail now
    # bad method options fail here, before the run directory is made
    get_method(cfg.method)(teacher, build_method_config(cfg.method, cfg.options), guidance=cfg.guidance)
    if cfg.out is None:
        cfg = dataclasses.replace(cfg, out=str(default_run_dir(cfg.method, cfg.teacher)))
    if check_out:  # only the main process checks: the others may already see the directory it made
        ensure_new_path(cfg.out, "--out")
    return cfg


def teacher_options(cfg: DistillConfig) -> dict:
    """Options for loading the teacher (diffusers teachers: the run's resolution)."""
    return {"resolution": cfg.resolution} if cfg.resolution is not None else {}


def student_options(cfg: DistillConfig) -> dict:
    """How methods derive students and fake scores from a diffusers teacher (`DistillMethod.student_options`)."""
    out = {}
    if cfg.lora_rank:
        out["lora_rank"] = int(cfg.lora_rank)
        if cfg.lora_alpha:
            out["lora_alpha"] = float(cfg.lora_alpha)
    if cfg.gradient_checkpointing:
        out["gradient_checkpointing"] = True
    return out


def make_optimizer(kind: str, params, *, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0):
    """AdamW (Loshchilov & Hutter 2019), or bitsandbytes' AdamW8bit (block-wise 8-bit moments, Dettmers et al.
    2022) when `kind` is "adamw8bit" and bitsandbytes is installed."""
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise FewstepError("--optimizer adamw8bit needs bitsandbytes, which is not installed (pip install "
                               "bitsandbytes), or use --optimizer adamw") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if kind != "adamw":
        raise FewstepError(f"unknown --optimizer {kind!r}; allowed: adamw, adamw8bit")
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)


def _to_device(cond, device):
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v.to(device) for k, v in cond.items()}
    return cond.to(device)


def write_config(cfg: DistillConfig) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # stop_after belongs to one invocation, not to the run: a resumed run goes on to `iters` unless told otherwise
    _write_yaml(out / CONFIG_YAML, {**dataclasses.asdict(cfg), "stop_after": None})
