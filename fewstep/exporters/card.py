"""The model card (README.md) of every exported student: what it is, how it samples, how to load it, and the run's
metrics (its quality table when it has one, its training time and last logged losses)."""

from __future__ import annotations

from pathlib import Path


def metrics_lines(rows: list[dict], run: dict) -> list[str]:
    """The "## Metrics" section: the quality table, else a note on how to score the student; then the run's
    training time and last logged (averaged) losses."""
    lines = ["## Metrics", ""]
    if rows:
        lines += ["| model | solver | steps | metric | value |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['solver']} | {r['steps']} | {r['metric']} | {r['value']:.4f} |" for r in rows]
        lines.append("")  # a line right under a table would be read as one more row of it
    else:
        lines.append("No quality table (fewstep has no built-in text-to-image metric; score samples with "
                     "`fewstep eval fid` or `fewstep eval clip`)." if run.get("text") else
                     "No quality table (the run was not evaluated; score samples with `fewstep eval`).")
    if run.get("train_seconds") is not None:
        lines.append(f"Training: {run['train_seconds']} s.")
    if run.get("losses"):
        lines.append("Last logged losses (moving averages): " +
                     ", ".join(f"{k} {v:.4g}" for k, v in sorted(run["losses"].items())) + ".")
    return lines


def diffusers_usage(den, info: dict, load: str) -> str:
    """A Python snippet that samples the exported pipeline like fewstep's default sampler."""
    meta = den.meta
    h, w = meta.get("resolution", [None, None])
    g = float(meta.get("default_guidance", 1.0))
    n = info["default_steps"]
    return "\n".join([
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        *load.splitlines(),
        f'image = pipe("a photo of a cat", num_inference_steps={n}, guidance_scale={g}, height={h}, width={w},',
        "             generator=torch.Generator().manual_seed(0)).images[0]",
        "```",
    ])


def model_card(den, fmt: str, out: str | Path, rows: list[dict] | None = None, run: dict | None = None,
               info: dict | None = None) -> str:
    """README.md text for a student exported as `fmt`: "safetensors" (fewstep's own format), "diffusers" (a
    pipeline folder) or "lora" (diffusers LoRA weights); `info` is the scheduler info of the diffusers formats
    (`fewstep.exporters.diffusers.scheduler_for`), `run` the run's summary (`fewstep.training.run.run_summary`)."""
    rows, run = rows or [], dict(run or {})
    meta = den.meta
    if fmt == "safetensors":
        lines = [f"# fewstep student ({meta.get('method', 'model')})", "",
                 f"- distilled from: {meta.get('distilled_from', 'n/a')}",
                 f"- method: {meta.get('method', 'n/a')}, iterations: {meta.get('iterations', 'n/a')}",
                 f"- sampler: {meta.get('default_solver')} with {meta.get('default_steps')} step(s) by default, "
                 f"guidance {meta.get('default_guidance', 1.0)}",
                 f"- load: `fewstep sample --model {out} --steps 1`", ""]
        if rows or run:  # a run's student; a plain model directory has nothing to report
            lines += metrics_lines(rows, {**run, "text": den.cond_kind == "text"})
        return "\n".join(lines) + "\n"
    net = den.net
    lora = getattr(net, "role", "") == "lora"
    kind = f"LoRA (rank {net.rank}, alpha {net.alpha:g}) on the teacher's weights" if lora else "full fine-tuning"
    g = float(meta.get("default_guidance", 1.0))
    flux = getattr(net, "arch", None) == "flux" and den.guidance_embedded
    guided = ("Flux's guidance embedding (guidance-distilled; no CFG pass)" if flux else
              "a guidance-scale input (LCM-style; no CFG pass)" if den.guidance_embedded else
              "classifier-free guidance" if g != 1.0 else "no classifier-free guidance")
    teacher_scale = "guidance scale (Flux's guidance embedding)" if flux else "CFG scale"
    lines = [
        "---", "library_name: diffusers", "tags: [fewstep, distillation, few-step]", "---", "",
        f"# {meta.get('method', 'fewstep')} student of {meta.get('teacher_name', meta.get('source', 'a teacher'))}", "",
        f"- method: `{meta.get('method', 'n/a')}`, {meta.get('iterations', 'n/a')} iterations ({kind})",
        f"- teacher: `{meta.get('source', 'n/a')}` ({meta.get('pipeline', '')})",
        f"- steps: {info['default_steps']} by default (model times {info['timesteps']}); guidance scale {g:g} "
        f"({guided})",
        f"- sampler: fewstep `{meta.get('default_solver')}` with {meta.get('default_renoise', 'fresh')} re-noise; "
        f"scheduler `{info['scheduler']}` reproduces it at {', '.join(map(str, info['exact_steps'])) or 'no'} "
        "step(s)",
        f"- resolution: {meta.get('resolution')}",
        *([f"- distilled with the teacher at {teacher_scale} {run['guidance']:g}"] if run.get("guidance") is not None
          else []),
        "",
        "## Use", "",
    ]
    if fmt == "diffusers":
        load = f'pipe = DiffusionPipeline.from_pretrained("{out}")'
    else:
        load = "\n".join([f"from diffusers import {info['scheduler']}",
                          f'pipe = DiffusionPipeline.from_pretrained("{meta.get("source")}")',
                          f'pipe.load_lora_weights("{out}")',
                          f'pipe.scheduler = {info["scheduler"]}.from_pretrained("{out}", subfolder="scheduler")'])
    lines += [diffusers_usage(den, info, load), "",
              "Images equal `fewstep sample --model RUN --prompt ... --seed S` when the pipeline gets one generator "
              "per image: `generator=[torch.Generator().manual_seed(s) for s in "
              "fewstep.sampling.sample_seeds(S, 0, N)]` (float32; seed S=0 and one image: "
              "`torch.Generator().manual_seed(0)`).", ""]
    lines += metrics_lines(rows, {**run, "text": True})
    lines.append("")
    return "\n".join(lines)
