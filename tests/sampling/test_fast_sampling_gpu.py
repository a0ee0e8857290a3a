"""The sampler engine on CUDA: device/dtype auto choices, CUDA graphs and compile against eager sampling, on a tiny
random SDXL pipeline and a built-in teacher. Run with `pytest -m gpu tests/sampling`; skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import fewstep
from fewstep.sampling.fast import GraphedNet
from fewstep.teachers import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from fewstep.teachers.random_pipelines import save_random_pipeline

    return save_random_pipeline("sdxl", tmp_path_factory.mktemp("sdxl") / "pipe")


def test_auto_device_and_dtype_on_cuda(tiny_sdxl):
    res = fewstep.sample(str(tiny_sdxl), num=2, steps=2, prompt="a red cube")
    assert res["device"].startswith("cuda") and res["dtype"] == "bf16"
    builtin = fewstep.sample("digits", num=4, steps=2)
    assert builtin["device"].startswith("cuda") and builtin["dtype"] == "fp32"
    cpu = fewstep.sample("digits", num=4, steps=2, device="cpu")
    # cuDNN convolutions may run in TF32: CUDA and CPU agree to about 1e-3 relative per call
    torch.testing.assert_close(builtin["_samples"], cpu["_samples"], rtol=1e-2, atol=1e-2)


def test_cuda_graphs_replay_what_eager_sampling_makes(tiny_sdxl):
    den = load_model(tiny_sdxl, "cuda", dtype="bf16")
    kw = dict(num=6, steps=4, solver="euler", batch_size=4, prompts=["a red cube", "two cats"])
    eager = fewstep.sample(den, **kw)["_samples"]
    graphed = fewstep.sample(den, cuda_graphs=True, **kw)
    assert graphed["fast"] == {"cuda_graphs": ["network", "vae decoder"], "cudnn_benchmark": True}
    assert isinstance(den.net, GraphedNet) and isinstance(den.components.vae.decoder, GraphedNet)
    # batches of 4 and 2, 4 steps each: per batch size one eager call, then a capture and 3 replays
    assert len(den.net._graphs) == 2 and den.net.replays == 6 and not den.net.failures
    torch.testing.assert_close(graphed["_samples"], eager, rtol=2e-2, atol=2e-2)
    again = fewstep.sample(den, **kw)  # graphs stay captured: replays only
    assert den.net.replays == 14 and len(den.net._graphs) == 2
    # (the first step of each batch size ran eagerly in the previous call, a replay now)
    torch.testing.assert_close(again["_samples"], graphed["_samples"], rtol=1e-3, atol=1e-3)


def test_compile_channels_last_and_graphs_together(tiny_sdxl):
    den = load_model(tiny_sdxl, "cuda", dtype="bf16")
    kw = dict(num=3, steps=1, solver="euler", batch_size=3, prompt="two cats")
    eager = fewstep.sample(den, **kw)["_samples"]
    fast = fewstep.sample(den, compile=True, channels_last=True, cuda_graphs=True, **kw)
    assert set(fast["fast"]) == {"compile", "channels_last", "cuda_graphs", "cudnn_benchmark"}
    torch.testing.assert_close(fast["_samples"], eager, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_cuda_graphs_on_transformer_teachers(arch, tmp_path):
    from fewstep.teachers.random_pipelines import save_random_pipeline

    den = load_model(save_random_pipeline(arch, tmp_path / arch), "cuda", dtype="bf16")
    kw = dict(num=4, steps=3, solver="euler", batch_size=4, prompt="two cats")
    eager = fewstep.sample(den, **kw)["_samples"]
    graphed = fewstep.sample(den, cuda_graphs=True, **kw)
    assert "cuda_graph_failures" not in graphed["fast"] and den.net.replays == 2
    torch.testing.assert_close(graphed["_samples"], eager, rtol=2e-2, atol=2e-2)


def test_sample_i_does_not_depend_on_the_batch_size_on_cuda(tiny_sdxl):
    den = load_model(tiny_sdxl, "cuda", dtype="fp32")
    kw = dict(num=7, steps=2, prompts=["a red cube", "two cats"])
    one = fewstep.sample(den, batch_size=1, **kw)["_samples"]
    seven = fewstep.sample(den, batch_size=7, **kw)["_samples"]
    torch.testing.assert_close(one, seven, rtol=1e-3, atol=1e-3)  # TF32 convolutions of other sizes
