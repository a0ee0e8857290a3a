"""Exact JVPs in bf16 on CUDA through the teacher families (tiny random pipelines): the kernel backend runs
every attention layer through the Triton kernel (no fallback: jvp=kernel), norm layers' float32 tangents are
cast back (torch's CUDA layer-norm rule), and the tangent is within 2e-2 of an fp32 torch.func reference.
Run with `pytest -m gpu tests/models`; skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.models.jvp import JVP, jvp
from fewstep.models.trigflow import TrigFlowDenoiser
from fewstep.teachers import load_teacher
from fewstep.teachers.random_pipelines import RANDOM_ARCHS, save_caption_folder, save_random_pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ARCHS = [a for a in ("sd15", "sdxl", "sd3", "flux") if a in RANDOM_ARCHS]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    return {**{arch: save_random_pipeline(arch, root / arch) for arch in ARCHS},
            "data": save_caption_folder(root / "captions")}


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_kernel_jvp_on_cuda_runs_the_triton_kernel_and_matches_fp32(folders, arch):
    den = load_teacher(folders[arch]).eval().to("cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *den.data_shape, generator=g).cuda()
    dx = torch.randn(2, *den.data_shape, generator=g).cuda()
    t = torch.tensor([0.4, 1.1], dtype=torch.float64, device="cuda")
    cond = {k: v.cuda() for k, v in den.components.encode_prompts(["a cat", "the red thing"]).items()}
    wrapper = TrigFlowDenoiser(den, 0.5, through_forward=False)

    def fn(a, b):
        return wrapper(a, b, cond)

    primals, tangents = (x, t), (dx, torch.ones_like(t))
    ref = jvp(fn, primals, tangents, backend="func", modules=[den]).float()
    layers = [m for m in den.modules() if hasattr(m, "set_processor") and getattr(m, "processor", None)]
    for backend in ("kernel", "func"):
        runner = JVP(backend)
        out = runner(fn, primals, tangents, modules=[den], dtype=torch.bfloat16)
        assert out.dtype == torch.bfloat16
        rel = float((out.float() - ref).norm() / ref.norm())
        assert rel < 2e-2, (backend, rel)
        if backend == "kernel":
            assert runner.attention == {"triton": len(layers)}


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_scm_bf16_on_cuda_logs_the_triton_kernel(folders, tmp_path, lora_rank):
    from fewstep import distill

    run = tmp_path / "run"
    res = distill(method="scm", teacher=str(folders["sdxl"]), data=str(folders["data"]), iters=2, batch_size=2,
                  mixed_precision="bf16", device="cuda", eval=False, sample_every=0, checkpoint_every=0, out=str(run),
                  options={"jvp": "kernel"}, lora_rank=lora_rank)
    assert res["jvp_backend"] == "kernel" and res["jvp_dtype"] == "bfloat16"
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"jvp"' in line]
    assert events and events[0]["attention"] == {"triton": 8}  # every layer of the tiny SDXL in the kernel
