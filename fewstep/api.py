"""The Python API: the one entrance for users and for the CLI. Every `fewstep` command is one call of a function
here (`fewstep sample` -> `sample`, `fewstep eval fid` -> `fid`, `fewstep teacher list` -> `list_teachers`, ...);
they are importable as ``from fewstep import ...``. Nothing below this module imports it."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fewstep.errors import FewstepError, check_choice
from fewstep.outputs import ensure_new_path, load_samples, save_samples
from fewstep.teachers import load_model


def _check_positive(name: str, value, minimum=1):
    if value is None:
        return
    if value < minimum:
        raise FewstepError(f"{name} must be >= {minimum}, got {value}")


def sample(
    model,
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
    device: str | None = None,
    dtype: str | None = None,
    compile: bool = False,
    cuda_graphs: bool = False,
    channels_last: bool = False,
    vae_tiling: bool = False,
    decode_batch_size: int | None = None,
) -> dict:
    """Generate `num` samples from a teacher or student and optionally write them to `out`.

    `model`: a built-in teacher name, model or run directory, diffusers pipeline, or a loaded Denoiser (then kept
    where it is unless `device`/`dtype` are given, and the fast-inference options stay applied to it, so repeated
    calls pay for compilation and graph capture once). `device`: auto | cpu | cuda | cuda:N (auto: CUDA when
    available); `dtype`: auto | fp32 | bf16 | fp16 (auto: bf16 for diffusers models on CUDA, fp32 otherwise).
    `compile`, `cuda_graphs`, `channels_last`, `vae_tiling`: fast inference (`fewstep.sampling.fast`). Latent
    models decode each sampling batch as it is made, `decode_batch_size` images per VAE call (default: the whole
    batch, as the stock pipelines do; lower it, or tile, when the decode runs out of memory).

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
    _check_positive("--decode-batch-size", decode_batch_size)
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
    from fewstep.sampling.fast import graphed_modules, prepare_inference

    den = _model_on_device(model, device, dtype)
    fast = prepare_inference(den, compile=compile, cuda_graphs=cuda_graphs, channels_last=channels_last,
                             vae_tiling=vae_tiling)
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
    cond, cond_index, prompt_list, decode = None, None, None, None
    t0 = time.perf_counter()
    if text:
        prompt_list = _prompt_list(prompt, prompts)
        unique = list(dict.fromkeys(prompt_list))
        encoded = den.components.encode_prompts(unique)  # each unique prompt once (and cached across calls)
        position = {p: i for i, p in enumerate(unique)}
        cond = encoded  # sample i's row: its prompt's, gathered batch by batch
        cond_index = torch.tensor([position[prompt_list[i % len(prompt_list)]] for i in range(num)])
        parts = den.components

        def decode(latents):  # each batch as it is made, on the model's device
            return parts.decode(latents, batch_size=decode_batch_size or len(latents))

    samples, used_labels = generate(den, num, timesteps=settings.timesteps, solver=solver, seed=seed,
                                    batch_size=batch_size, labels=labels, guidance=guidance, progress=progress,
                                    cond=cond, renoise=settings.renoise, decode=decode, cond_index=cond_index)
    seconds = time.perf_counter() - t0
    if fast.get("cuda_graphs"):  # signatures that could not be captured ran eagerly
        failures = [f for g in graphed_modules(den) for f in g.failures]
        if failures:
            fast = {**fast, "cuda_graph_failures": failures}
    result = {
        "model": str(model) if not isinstance(model, torch.nn.Module) else meta.get("teacher_name", "<model>"),
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
        **_where(den),
        "fast": fast,
        "seconds": round(seconds, 3),
        "samples_per_second": round(num / max(seconds, 1e-9), 1),
    }
    if out is not None:
        saved = save_samples(out, samples, used_labels, {k: v for k, v in result.items()})
        result["outputs"] = saved["paths"]
    result["_samples"], result["_labels"] = samples, used_labels
    return result


def _model_on_device(model, device, dtype):
    """A loaded Denoiser on `device` in `dtype`: `model` loaded (auto when None), or a Denoiser moved only where
    asked (with what it runs unregistered, a LoRA student's base weights, and its prompt encoders and VAE)."""
    from fewstep.devices import check_dtype, resolve_device, resolve_dtype

    check_dtype(dtype)
    if not isinstance(model, torch.nn.Module):
        return load_model(model, "auto" if device is None else device, dtype="auto" if dtype is None else dtype)
    if device is None and dtype is None:
        return model
    from fewstep.models.jvp import place_networks
    from fewstep.sampling.generation import model_device

    den = model
    dev = resolve_device(device) if device is not None else model_device(den)
    cast = resolve_dtype(dtype, dev, diffusers=den.components is not None) if dtype is not None else None
    den.to(dev)  # registered weights, the null condition, and any captured CUDA graphs dropped
    place_networks([den], device=dev, dtype=cast)
    if den.components is not None:
        den.components.to(dev)
    return den


def _where(den) -> dict:
    """Where a model ran: its device and precision (as the JSON results report them)."""
    from fewstep.devices import dtype_name
    from fewstep.sampling.generation import model_device, model_dtype

    return {"device": str(model_device(den)), "dtype": dtype_name(model_dtype(den))}


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
          batch_size: int = 1024, worker: int = 0, workers: int = 1, progress=None, device: str | None = None,
          dtype: str | None = None) -> dict:
    """Make (or finish) the pair set `out`: teacher (noise, ODE sample) pairs as sharded safetensors
    (see fewstep.sampling.pairs). `steps` defaults to the teacher's own; `progress(n, total)` after each batch.
    `device` (auto | cpu | cuda | cuda:N) and `dtype` (auto | fp32 | bf16 | fp16) as for `sample`; the teacher's
    weights in that dtype are part of what the set is (a set is finished in the precision it was started in),
    the device is not."""
    from fewstep.diffusion.timesteps import SPACINGS
    from fewstep.sampling.pairs import generate_pairs, open_pairs, shard_name

    _check_positive("--num", num)
    _check_positive("--steps", steps)
    _check_positive("--shard-size", shard_size)
    _check_positive("--batch-size", batch_size)
    check_choice("spacing", spacing, SPACINGS)
    if workers < 1 or not 0 <= worker < workers:
        raise FewstepError(f"need 0 <= --worker < --workers, got --worker {worker} --workers {workers}")
    den = _model_on_device(teacher, device, dtype)
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
    result.update(_where(den))
    return result


def fid(samples, ref, *, progress=None, **options) -> dict:
    """FID (optionally KID and precision/recall) of `samples` (an image folder, a samples .npz, or a model sampled
    `num` times) against `ref` (an image folder, a samples .npz, or a statistics .npz); see
    `fewstep.eval.fid.compute_fid` for the options (`device`: auto | cpu | cuda | cuda:N for Inception and a
    sampled model, `dtype`: the sampled model's precision). `progress(stage, n, total)` as batches are done."""
    from fewstep.eval.fid import compute_fid

    return compute_fid(samples, ref, progress=progress, **options)


def reference_stats(images, out: str | Path, *, progress=None, **options) -> dict:
    """Inception statistics of an image folder or samples .npz written once to the new .npz `out`, for
    `fid(..., ref=out)` (see `fewstep.eval.fid.reference_stats`)."""
    from fewstep.eval.fid import reference_stats as _reference_stats

    return _reference_stats(images, out, progress=progress, **options)


def clip_score(samples, prompts, *, clip, progress=None, **options) -> dict:
    """CLIP score, 100 * max(cos(image, prompt), 0) averaged over images, with a local CLIP folder `clip`
    (see `fewstep.eval.clip_score.compute_clip_score`)."""
    from fewstep.eval.clip_score import compute_clip_score

    return compute_clip_score(samples, prompts, clip=clip, progress=progress, **options)


def list_teachers() -> list[dict]:
    """The built-in teachers: name, data, shape, conditioning and parameter count of each."""
    from fewstep.teachers import BUILTIN_TEACHERS, load_teacher

    rows = []
    for name in BUILTIN_TEACHERS:
        den = load_teacher(name)
        rows.append({"name": name, "data": den.meta.get("data"), "shape": list(den.data_shape or []),
                     "conditioning": den.cond_kind, "params": sum(p.numel() for p in den.parameters())})
    return rows


def train_teacher(data: str, out: str | Path, *, device: str | None = None, dtype: str | None = None,
                  **kwargs) -> dict:
    """Train a flow-matching teacher on built-in data or an image folder into the new directory `out` (see
    fewstep.teachers.train): on `device` (auto | cpu | cuda | cuda:N; auto: CUDA when available) with the forward
    pass in `dtype` (auto | fp32 | bf16 | fp16; auto: fp32)."""
    from fewstep.devices import check_dtype, resolve_device
    from fewstep.teachers.train import train_teacher as _train

    resolve_device(device)  # bad input fails before anything is written
    check_dtype(dtype)
    ensure_new_path(out, "--out")
    return _train(data, out, device="auto" if device is None else device, dtype="auto" if dtype is None else dtype,
                  **kwargs)


def distill(config=None, *, resume: bool = False, progress=None, progress_eval=None, status=None,
            teacher_model=None, update_options: dict | None = None, **overrides) -> dict:
    """Distill a teacher into a few-step student; returns a JSON-able summary with the quality table.

    `config`: a YAML recipe path, a dict or a DistillConfig; keyword `overrides` are DistillConfig fields
    (method, teacher, iters, batch_size, lr, out, ...) and win over it (`options` replaces the config's method
    options); `update_options` sets method options on top of them key by key, as `--opt KEY=VALUE` does.
    `resume=True` continues the run in `out`. Progress callbacks: `progress(iteration, total, losses)`,
    `progress_eval()` per quality-table row, `status(text)`. See fewstep.training.distill.
    """
    from fewstep.training import distill as _distill

    return _distill(config, resume=resume, progress=progress, progress_eval=progress_eval, status=status,
                    teacher_model=teacher_model, update_options=update_options, **overrides)


def list_methods() -> list[dict]:
    """The distillation methods: name, description and options with their defaults."""
    import dataclasses

    from fewstep.methods import available_methods, get_method

    rows = []
    for name in available_methods():
        cls = get_method(name)
        opts = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                for f in dataclasses.fields(cls.config_class)}
        rows.append({"name": name, "description": cls.description, "options": opts})
    return rows


def export(run: str | Path, out: str | Path, *, format: str = "safetensors") -> dict:
    """Write a run's student to the new directory `out`: fewstep's safetensors + config.json (`safetensors`), a
    complete diffusers pipeline folder (`diffusers`, students of diffusers teachers) or diffusers LoRA weights
    (`lora`), each with a model card."""
    from fewstep.exporters import EXPORT_FORMATS, export_lora, export_pipeline, export_safetensors
    from fewstep.training.run import read_metrics, run_summary

    check_choice("--format", format, EXPORT_FORMATS)
    if not Path(run).exists():
        raise FewstepError(f"run {str(run)!r} not found")
    out = ensure_new_path(out, "--out")
    den = load_model(run)
    metrics = read_metrics(run)
    rows, summary = metrics.get("table") or [], run_summary(run, metrics)
    if format == "safetensors":
        res = export_safetensors(den, out, rows, summary)
        return {"run": str(run), "format": format, "out": str(out), "files": res["files"]}
    res = (export_pipeline if format == "diffusers" else export_lora)(den, out, rows, summary)
    return {"run": str(run), "format": format, "out": str(out), "scheduler": res["scheduler"]["scheduler"],
            "exact_steps": res["scheduler"]["exact_steps"], "files": [str(out / f) for f in res["files"]]}
