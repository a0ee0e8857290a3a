"""sCM and rCM with --mixed-precision bf16 on diffusers teachers (tiny random pipelines, CPU): the JVP runs in
bf16 through fewstep's attention (the kernel backend; its reference attention path on the CPU), and the
backend that ran is in log.jsonl and metrics.json."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fewstep import distill
from fewstep.teachers.random_pipelines import RANDOM_ARCHS, save_caption_folder, save_random_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = [a for a in ("sdxl", "sd3", "flux") if a in RANDOM_ARCHS]
LAYERS = {"sdxl": 8, "sd3": 2, "flux": 2}  # attention layers of the tiny pipelines (SDXL: self + cross in 4 blocks)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return {**{arch: save_random_pipeline(arch, root / arch) for arch in ARCHS},
            "data": save_caption_folder(root / "captions")}


def _events(run):
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("event") == "jvp"]


@pytest.mark.parametrize("arch", ARCHS)
def test_scm_bf16_steps_run_the_jvp_in_bf16_through_the_kernel(inputs, arch, tmp_path):
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*finite differences.*")
        res = distill(method="scm", teacher=str(inputs[arch]), data=str(inputs["data"]), iters=2, batch_size=2,
                      mixed_precision="bf16", eval=False, sample_every=0, checkpoint_every=0, out=str(run))
    assert res["finished"] and res["jvp_backend"] == "kernel" and res["jvp_dtype"] == "bfloat16"
    (event,) = _events(run)
    assert event["backend"] == "kernel" and event["dtype"] == "bfloat16"
    # every layer through fewstep's attention, none of it masked
    assert event["attention"] == {"reference": LAYERS[arch]}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["jvp_backend"] == "kernel" and metrics["jvp_attention"] == event["attention"]
    from safetensors.torch import load_file

    student = load_file(str(run / "student_online" / "model.safetensors"))
    assert student and all(torch.isfinite(v).all() for v in student.values())


def test_rcm_bf16_lora_logs_the_kernel_and_a_named_backend_is_kept(inputs, tmp_path):
    run = tmp_path / "rcm"
    res = distill(method="rcm", teacher=str(inputs["sdxl"]), data=str(inputs["data"]), iters=2, batch_size=2,
                  lora_rank=4, mixed_precision="bf16", eval=False, sample_every=0, checkpoint_every=0, out=str(run),
                  options={"jvp": "func"})
    assert res["jvp_backend"] == "func" and res["jvp_dtype"] == "bfloat16" and res["jvp_attention"] == {}
    (event,) = _events(run)
    assert event["backend"] == "func" and event["iteration"] == 1
    kernel = distill(method="scm", teacher=str(inputs["sdxl"]), data=str(inputs["data"]), iters=1, batch_size=2,
                     lora_rank=4, mixed_precision="bf16", eval=False, sample_every=0, checkpoint_every=0,
                     out=str(tmp_path / "scm_lora"))
    # the LoRA student's (unregistered) diffusers tree runs the JVP: all 8 attention layers, in bf16
    assert kernel["jvp_backend"] == "kernel" and kernel["jvp_attention"] == {"reference": 8}
    assert kernel["jvp_dtype"] == "bfloat16"
