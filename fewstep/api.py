"""The Python API behind every CLI command: one call each, importable as ``from fewstep import ...``."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fewstep.errors import FewstepError, check_choice
from fewstep.outputs import ensure_new_path, load_samples, save_samples


def load_model(spec: str | Path, device="cpu", **teacher_options):
    """A Denoiser from a built-in teacher name, a model directory (config.json + model.safetensors), a
    diffusers pipeline (alias, hub id or folder; `teacher_options`: resolution, dtype), or a distillation
    run directory (its student: the EMA weights when the run kept an EMA)."""
    from fewstep.teachers import load_teacher

    path = Path(str(spec))
    if path.is_dir() and not (path / "config.json").is_file() and (path / "config.yaml").is_file():
        student = path / "student"
        if not (student / "config.json").is_file():
            raise FewstepError(f"run {str(path)!r} has no finished student yet (student/ is missing); "
                               f"continue it with `fewstep distill --resume --out {path}`")
        return load_teacher(student, device)
    return load_teacher(spec, device, **teacher_options)


def _check_positive(name: str, value, minimum=1):
    if value is None:
        return
    if value < minimum:
        raise FewstepError(f"{name} must be >= {minimum}, got {value}")


def sample(
    model: str,
    *,
    num: int = 4096,
    steps: int | None = None,
    solver: str | None = None,
    spacing: str | None = None,
    seed: int = 0,
    guidance: float | None = None,
    label: int | None = None,
    batch_size: int | None = None,
    out: str | Path | None = None,
    progress=None,
    renoise: str | None = None,
    prompt: str | None = None,
    prompts: str | Path | list[str] | None = None,
) -> dict:
    """Generate `num` samples from a teacher or student and optionally write them to `out`.

    Sample i uses per-sample seed i of `seed`, so results do not depend on the batch size.
    Settings left as None come from the model (`fewstep.sampling.sampler_settings`): its default solver,
    steps, re-noise rule, guidance, and the time list it was trained on.
    Text-to-image models take `prompt` (one for all samples) or `prompts` (a list or a prompt file; sample i
    gets prompt i modulo their number; none: the empty prompt) and return decoded images in [-1, 1]; their
    sample i equals a stock diffusers pipeline's image with ``generator=torch.Generator().manual_seed(s_i)``,
    s_i = ``fewstep.sampling.sample_seeds(seed, 0, num)[i]``, at the same steps, guidance and prompt.
    Returns a JSON-able summary (and the tensors under the private keys "_samples", "_labels").
    """
    from fewstep.diffusion.timesteps import SPACINGS
    from fewstep.sampling import check_renoise, check_solver, generate, sampler_settings

    _check_positive("--num", num)
    _check_positive("--steps", steps)
    _check_positive("--batch-size", batch_size)
    if guidance is not None and guidance < 0:
        raise FewstepError(f"--guidance must be >= 0, got {guidance}")
    if solver is not None:
        check_solver(solver)
    if spacing is not None:
        check_choice("spacing", spacing, SPACINGS)
    if renoise is not None:
        check_renoise(renoise)
    if prompt is not None and prompts is not None:
        raise FewstepError("give --prompt or --prompts, not both")
    if out is not None:
        ensure_new_path(out)
    den = load_model(model)
    meta = den.meta
    text = den.cond_kind == "text" and den.components is not None
    batch_size = batch_size or (8 if text else 1024)
    if (prompt is not None or prompts is not None) and not text:
        raise FewstepError(f"--prompt/--prompts need a text-to-image model; {model!r} is not")
    # the model's own defaults (e.g. a guidance-embedded student's training scale) for what was left out
    settings = sampler_settings(den, steps=steps, solver=solver, renoise=renoise, guidance=guidance, spacing=spacing)
    steps, solver, guidance, spacing = settings.steps, settings.solver, settings.guidance, settings.spacing
    labels = None
    if label is not None:
        if den.cond_kind != "class":
            raise FewstepError(f"--label needs a class-conditional model; {model!r} is not")
        if not 0 <= label < den.num_classes:
            raise FewstepError(f"--label must be in 0..{den.num_classes - 1}, got {label}")
        labels = torch.full((num,), int(label), dtype=torch.long)
    if guidance != 1.0 and den.cond_kind == "none":
        raise FewstepError(f"--guidance needs a conditional model; {model!r} is unconditional")
    if out is not None and den.data_shape is not None and len(den.data_shape) == 1 and Path(out).suffix != ".npz":
        raise FewstepError(f"2-D samples are written as .npz; got --out {str(out)!r} (use e.g. samples.npz)")
    cond, prompt_list = None, None
    if text:
        prompt_list = _prompt_list(prompt, prompts)
        unique = list(dict.fromkeys(prompt_list))
        encoded = den.components.encode_prompts(unique)
        rows = torch.tensor([unique.index(prompt_list[i % len(prompt_list)]) for i in range(num)])
        cond = {k: v[rows] for k, v in encoded.items()}
    t0 = time.perf_counter()
    samples, used_labels = generate(den, num, timesteps=settings.timesteps, solver=solver, seed=seed,
                                    batch_size=batch_size, labels=labels, guidance=guidance, progress=progress,
                                    cond=cond, renoise=settings.renoise)
    if text:
        samples = den.components.decode(samples)
    seconds = time.perf_counter() - t0
    result = {
        "model": str(model),
        "data": meta.get("data"),
        "num": int(num),
        "steps": int(steps),
        "solver": solver,
        "spacing": spacing,
        "renoise": settings.renoise,
        "seed": int(seed),
        "guidance": float(guidance),
        "label": label,
        **({"prompts": prompt_list} if prompt_list is not None else {}),
        "seconds": round(seconds, 3),
        "samples_per_second": round(num / max(seconds, 1e-9), 1),
    }
    if out is not None:
        saved = save_samples(out, samples, used_labels, {k: v for k, v in result.items()})
        result["outputs"] = saved["paths"]
    result["_samples"], result["_labels"] = samples, used_labels
    return result


def _prompt_list(prompt, prompts) -> list[str]:
    if prompt is not None:
        return [str(prompt)]
    if prompts is None:
        return [""]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise FewstepError("the prompt list is empty")
        return [str(p) for p in prompts]
    from fewstep.data.prompts import read_prompt_rows

    return [r.prompt for r in read_prompt_rows(prompts)]


def evaluate_samples(metric: str | None, samples, *, ref: str | None = None) -> dict:
    """Score samples (a path written by `sample`, or a tensor) with a metric against a reference.

    `ref` is a built-in data name (toy:checkerboard, digits, ...) or a path to another sample set;
    by default the data the samples' model was trained on. `metric` None picks the data's default.
    """
    from fewstep.data import DATA_NAMES, canonical_data_name
    from fewstep.eval import METRICS, default_metric, evaluate

    labels = None
    meta: dict = {}
    if isinstance(samples, (str, Path)):
        source = str(samples)
        samples, labels, meta = load_samples(samples)
    else:
        source = "<tensor>"
    data = None
    ref_tensor = None
    ref_name = ref
    if ref is None:
        data = meta.get("data")
        if data is None:
            raise FewstepError("--ref is needed: the samples do not say which data they model "
                               f"(give one of {', '.join(DATA_NAMES)} or a path to reference samples)")
        ref_name = data
    elif canonical_data_name(ref) in DATA_NAMES:
        data = canonical_data_name(ref)
        ref_name = data
    elif Path(ref).exists():
        ref_tensor, _, _ = load_samples(ref)
    else:
        raise FewstepError(f"unknown reference {ref!r}; allowed: {', '.join(DATA_NAMES)} or a samples path")
    if metric is None:
        if data is None:
            raise FewstepError(f"give a metric; allowed: {', '.join(METRICS)}")
        metric = default_metric(data)
    result = evaluate(metric, samples, ref_tensor, data=data, labels=labels)
    result["samples"] = source
    result["ref"] = ref_name
    return result


def pairs(teacher: str, out: str | Path, *, num: int, steps: int | None = None, solver: str = "heun",
          spacing: str = "uniform", seed: int = 0, guidance: float = 1.0, shard_size: int = 4096,
          batch_size: int = 1024, worker: int = 0, workers: int = 1, progress=None) -> dict:
    """Make (or finish) the pair set `out`: teacher (noise, ODE sample) pairs as sharded safetensors
    (see fewstep.sampling.pairs). `steps` defaults to the teacher's own; `progress(n, total)` after each batch."""
    from fewstep.diffusion.timesteps import SPACINGS
    from fewstep.sampling.pairs import generate_pairs, open_pairs, shard_name

    _check_positive("--num", num)
    _check_positive("--steps", steps)
    _check_positive("--shard-size", shard_size)
    _check_positive("--batch-size", batch_size)
    check_choice("spacing", spacing, SPACINGS)
    if workers < 1 or not 0 <= worker < workers:
        raise FewstepError(f"need 0 <= --worker < --workers, got --worker {worker} --workers {workers}")
    den = load_model(teacher)
    if guidance != 1.0 and den.cond_kind == "none":
        raise FewstepError(f"--guidance needs a conditional model; {teacher!r} is unconditional")
    steps = int(steps or den.meta.get("default_steps", 50))
    kw = dict(steps=steps, solver=solver, spacing=spacing, seed=seed, guidance=guidance, shard_size=shard_size,
              batch_size=batch_size, teacher_spec=str(teacher))
    manifest = open_pairs(den, out, num, **kw)
    todo = sum(min(shard_size, num - j * shard_size) for j in range(manifest["num_shards"])
               if j % workers == worker and not (Path(out) / shard_name(j)).is_file())
    result = generate_pairs(den, out, num, **kw, worker=worker, workers=workers,
                            progress=(lambda n: progress(n, todo)) if progress is not None else None)
    result["data"] = den.meta.get("data")
    return result


def train_teacher(data: str, out: str | Path, **kwargs) -> dict:
    """Train a flow-matching teacher on built-in data or an image folder (see fewstep.teachers.train)."""
    from fewstep.teachers.train import train_teacher as _train

    return _train(data, out, **kwargs)


def distill(config=None, **kwargs) -> dict:
    """Distill a teacher into a few-step student (see fewstep.training.distill)."""
    from fewstep.training import distill as _distill

    return _distill(config, **kwargs)


EXPORT_FORMATS = ("safetensors", "diffusers", "lora")


def run_summary(run: str | Path, metrics: dict) -> dict:
    """What a model card reports about the run that made a student: its CFG scale, training time and the last
    logged (averaged) losses."""
    import json

    run = Path(run)
    out: dict = {}
    if (run / "config.yaml").is_file():
        from fewstep.training.config import load_yaml

        cfg = load_yaml(run / "config.yaml")
        out.update({k: cfg.get(k) for k in ("guidance", "iters", "batch_size", "lr", "lora_rank", "resolution")})
    if metrics.get("train_seconds") is not None:
        out["train_seconds"] = metrics["train_seconds"]
    if (run / "log.jsonl").is_file():
        for line in reversed((run / "log.jsonl").read_text().splitlines()):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "losses_avg" in rec:
                out["losses"] = rec["losses_avg"]
                break
    return out


def export(run: str | Path, out: str | Path, *, format: str = "safetensors") -> dict:
    """Write a run's student to the new directory `out`: fewstep's safetensors + config.json + README.md, a
    complete diffusers pipeline folder (`diffusers`, students of diffusers teachers) or diffusers LoRA weights
    (`lora`), each with a model card."""
    import json

    from fewstep.models.io import CONFIG, WEIGHTS, save_denoiser

    if format not in EXPORT_FORMATS:
        raise FewstepError(f"unknown --format {format!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    if not Path(run).exists():
        raise FewstepError(f"run {str(run)!r} not found")
    out = ensure_new_path(out, "--out")
    den = load_model(run)
    metrics_path = Path(run) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    rows = metrics.get("table") or []
    if format in ("diffusers", "lora"):
        from fewstep.exporters import export_lora, export_pipeline

        res = (export_pipeline if format == "diffusers" else export_lora)(den, out, rows, run_summary(run, metrics))
        return {"run": str(run), "format": format, "out": str(out), "scheduler": res["scheduler"]["scheduler"],
                "exact_steps": res["scheduler"]["exact_steps"], "files": [str(out / f) for f in res["files"]]}
    save_denoiser(den, out)
    meta = den.meta
    card = [f"# fewstep student ({meta.get('method', 'model')})", "",
            f"- distilled from: {meta.get('distilled_from', 'n/a')}",
            f"- method: {meta.get('method', 'n/a')}, iterations: {meta.get('iterations', 'n/a')}",
            f"- sampler: {meta.get('default_solver')} with {meta.get('default_steps')} step(s) by default, "
            f"guidance {meta.get('default_guidance', 1.0)}",
            f"- load: `fewstep sample --model {out} --steps 1`", ""]
    if rows:
        card += ["| model | solver | steps | metric | value |", "|---|---|---|---|---|"]
        card += [f"| {r['model']} | {r['solver']} | {r['steps']} | {r['metric']} | {r['value']:.4f} |"
                 for r in rows]
    from fewstep.fileio import atomic_write

    atomic_write(out / "README.md", lambda tmp: Path(tmp).write_text("\n".join(card) + "\n"))
    return {"run": str(run), "format": format, "out": str(out),
            "files": [str(out / WEIGHTS), str(out / CONFIG), str(out / "README.md")]}
