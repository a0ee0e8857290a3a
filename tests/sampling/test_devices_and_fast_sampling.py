"""--device / --dtype for every command that runs a network, and the fast-inference options of `fewstep sample`
(compile, CUDA graphs through GraphedNet, channels_last, prompt cache, VAE decode per batch), on the CPU."""

from __future__ import annotations

import pytest
import torch
from support import assert_one_line_error, cli_run, ok_json

import fewstep
from fewstep.devices import resolve_device, resolve_dtype
from fewstep.errors import FewstepError
from fewstep.sampling import generate
from fewstep.sampling.fast import GraphedNet, eager_capture, prepare_inference
from fewstep.teachers import BUILTIN_TEACHERS, load_model


# -- resolving the flags -------------------------------------------------------------------------------------
def test_device_and_dtype_resolution():
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")  # no CUDA here
    assert resolve_device("CPU") == torch.device("cpu")
    for bad, needle in (("tpu", "unknown --device"), ("cuda:x", "unknown --device"), ("cuda", "not available"),
                        ("cuda:3", "not available")):
        with pytest.raises(FewstepError, match=needle):
            resolve_device(bad)
    cuda = torch.device("cuda", 0)  # resolve_dtype only reads the device type
    assert resolve_dtype("auto", cuda, diffusers=True) is torch.bfloat16
    assert resolve_dtype("auto", cuda, diffusers=False) is torch.float32
    assert resolve_dtype("auto", torch.device("cpu"), diffusers=True) is torch.float32
    assert resolve_dtype("fp16", torch.device("cpu"), diffusers=False) is torch.float16
    assert resolve_dtype(torch.bfloat16, torch.device("cpu"), diffusers=False) is torch.bfloat16
    with pytest.raises(FewstepError, match="unknown --dtype 'fp64'"):
        resolve_dtype("fp64", torch.device("cpu"), diffusers=False)


def test_auto_picks_cuda_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(FewstepError, match="2 CUDA device"):
        resolve_device("cuda:2")


@pytest.fixture
def recorded_loads(monkeypatch):
    """fewstep.teachers.load_model records the device and dtype every command asks for (and loads on the CPU)."""
    import fewstep.api
    import fewstep.eval.sources

    calls = []

    def fake(spec, device="cpu", *, dtype=None, **kw):
        calls.append((str(spec), resolve_device(device), dtype))
        return load_model(spec, "cpu", dtype=dtype, **kw)

    monkeypatch.setattr(fewstep.api, "load_model", fake)
    monkeypatch.setattr(fewstep.eval.sources, "load_model", fake)
    return calls


def test_flags_reach_the_model_loader(tmp_path, recorded_loads, monkeypatch):
    ok_json(cli_run("sample", "--teacher", "toy:moons", "--num", "8", "--steps", "2", "--device", "cpu",
                    "--dtype", "bf16", "--json"))
    ok_json(cli_run("pairs", "--teacher", "toy:moons", "--num", "8", "--steps", "2", "--out", tmp_path / "p",
                    "--dtype", "fp16", "--json"))
    assert recorded_loads == [("toy:moons", torch.device("cpu"), "bf16"), ("toy:moons", torch.device("cpu"), "fp16")]
    # auto means CUDA when there is one (the fake loader still loads on the CPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ok_json(cli_run("sample", "--teacher", "toy:moons", "--num", "4", "--steps", "1", "--json"))
    assert recorded_loads[-1] == ("toy:moons", torch.device("cuda", 0), "auto")


def test_eval_fid_model_source_takes_device_and_dtype(tmp_path):
    from fewstep.eval.sources import open_samples

    src = open_samples("digits", num=4, steps=1, batch_size=4, device="cpu", dtype="bf16")
    assert src.describe()["device"] == "cpu" and src.describe()["dtype"] == "bf16"
    batch = next(iter(src.batches()))
    assert batch.dtype == torch.float32 and batch.shape == (4, 1, 8, 8) and torch.isfinite(batch).all()
    with pytest.raises(FewstepError, match="unknown --dtype"):
        open_samples("digits", num=4, dtype="int8")


def test_teacher_train_on_a_device_in_a_precision(tmp_path):
    res = fewstep.train_teacher("toy:moons", tmp_path / "t", iters=4, batch_size=16, device="cpu", dtype="bf16")
    assert res["device"] == "cpu" and res["dtype"] == "bf16"
    den = load_model(tmp_path / "t")
    assert next(den.parameters()).dtype == torch.float32  # autocast: the weights stay fp32
    assert "--dtype bf16" in den.meta["train_command"]
    res16 = fewstep.train_teacher("toy:moons", tmp_path / "t16", iters=4, batch_size=16, device="cpu", dtype="fp16")
    assert res16["dtype"] == "fp16" and res16["final_loss"] == res16["final_loss"]  # finite, with loss scaling
    r = cli_run("teacher", "train", "--data", "toy:moons", "--out", tmp_path / "bad", "--device", "cuda")
    assert_one_line_error(r, "--device cuda", "not available")
    assert not (tmp_path / "bad").exists()


def test_one_line_errors_for_bad_flags():
    assert_one_line_error(cli_run("sample", "--teacher", "digits", "--num", "2", "--dtype", "fp64"), "fp64")
    assert_one_line_error(cli_run("sample", "--teacher", "digits", "--num", "2", "--device", "gpu"), "'gpu'")
    assert_one_line_error(cli_run("sample", "--teacher", "digits", "--num", "2", "--cuda-graphs"),
                          "--cuda-graphs", "CUDA")
    assert_one_line_error(cli_run("sample", "--teacher", "digits", "--num", "2", "--vae-tiling"), "--vae-tiling")


# -- the same samples whatever the batch, and in bf16 --------------------------------------------------------
def test_sample_i_does_not_depend_on_the_batch_size():
    for spec in ("digits", "toy:checkerboard"):
        den = load_model(spec)
        one = fewstep.sample(den, num=7, steps=2, batch_size=1)["_samples"]
        seven = fewstep.sample(den, num=7, steps=2, batch_size=7)["_samples"]
        torch.testing.assert_close(one, seven, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", BUILTIN_TEACHERS)
def test_bf16_on_the_cpu_for_every_builtin_teacher(spec):
    ref = fewstep.sample(spec, num=64, steps=4, dtype="fp32")
    res = fewstep.sample(spec, num=64, steps=4, dtype="bf16")
    assert res["dtype"] == "bf16" and res["device"] == "cpu" and ref["dtype"] == "fp32"
    got, want = res["_samples"], ref["_samples"]
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # bf16 keeps ~3 significant digits: the samples move by a small fraction of their spread
    assert float((got - want).abs().mean()) < 0.1 * float(want.std())


def test_a_loaded_model_stays_where_it_is_unless_asked():
    den = load_model("digits")
    fewstep.sample(den, num=2, steps=1)
    assert next(den.parameters()).dtype == torch.float32
    res = fewstep.sample(den, num=2, steps=1, dtype="bf16")
    assert res["dtype"] == "bf16" and den.net.conv_in.weight.dtype == torch.bfloat16
    assert den.net.embed.mlp[0].weight.dtype == torch.float32  # the time embedding stays fp32 by design


def test_a_lora_student_moves_and_casts_with_its_base(tiny_sdxl):
    """A LoRA student runs a module tree it does not register (over its teacher's weights): --dtype reaches it."""
    from fewstep.models.denoiser import Denoiser
    from fewstep.sampling.fast import network_module

    teacher = load_model(tiny_sdxl)
    net = teacher.net.derive(lora_rank=2)
    student = Denoiser(net, teacher.process, teacher.prediction, cond_kind="text", null_cond=teacher._null_cond,
                       data_shape=teacher.data_shape, meta=teacher.meta)
    student.components = teacher.components
    res = fewstep.sample(student, num=2, steps=1, prompt="a red cube", dtype="bf16")
    assert res["dtype"] == "bf16" and torch.isfinite(res["_samples"]).all()
    tree = network_module(student)
    assert {p.dtype for p in tree.parameters()} == {torch.bfloat16}
    assert teacher.net.model.conv_in.weight is tree.conv_in.weight  # still one shared copy of the base


# -- fast inference ------------------------------------------------------------------------------------------
def test_compile_on_the_cpu_matches_eager():
    from torch._dynamo.utils import counters

    eager = fewstep.sample("toy:checkerboard", num=32, steps=2)
    before = counters["stats"]["unique_graphs"]
    den = load_model("toy:checkerboard")
    compiled = fewstep.sample(den, num=32, steps=2, compile=True)
    assert compiled["fast"] == {"compile": ["network"]}
    assert den.net._compiled_call_impl is not None and counters["stats"]["unique_graphs"] > before  # it compiled
    torch.testing.assert_close(compiled["_samples"], eager["_samples"], rtol=1e-4, atol=1e-4)


def test_graphed_net_replays_one_capture_per_input_signature():
    """GraphedNet with the eager stand-in for a CUDA graph: a replay must see each call's own inputs (copied into
    the static buffers) and give what the plain network gives."""
    den = load_model("digits")
    plain, _ = generate(den, 7, steps=3, solver="heun", batch_size=4)
    den.net = GraphedNet(den.net, eager_capture)
    graphed, _ = generate(den, 7, steps=3, solver="heun", batch_size=4)
    torch.testing.assert_close(graphed, plain, rtol=1e-6, atol=1e-6)
    # batches of 4 and 3: two signatures; Heun, 3 steps: 5 calls per batch, the first eager (a warm-up), the
    # second captured, then replays
    assert len(den.net._graphs) == 2 and den.net.replays == 8 and den.net.eager_calls == 2
    # the state dict is the network's own (saving, fingerprints), and loads back through the wrapper
    state = den.state_dict()
    assert not any(".inner." in k for k in state) and set(state) == set(load_model("digits").state_dict())
    den.load_state_dict(state)
    # what the wrapped network has, the wrapper answers (its config, its plain attributes)
    assert den.net.config() == den.net.inner.config()
    name = next(iter(den.net.inner._modules))
    assert getattr(den.net, name) is getattr(den.net.inner, name)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    t = torch.full((2,), 0.5)
    out = den.net(x, t, torch.tensor([1, 2]))  # gradients: eager, differentiable
    out.sum().backward()
    assert x.grad is not None and den.net.eager_calls == 3
    tangent = torch.func.jvp(lambda a: den.net(a, t, torch.tensor([1, 2])), (x.detach(),), (torch.ones_like(x),))[1]
    assert den.net.eager_calls == 4 and tangent.abs().sum() > 0
    den.to(torch.float64)  # moving or casting the weights drops the graphs (they read the old memory)
    assert den.net._graphs == {}



def test_a_network_that_cannot_be_captured_runs_eagerly_and_says_why():
    den = load_model("digits")
    plain, _ = generate(den, 3, steps=2, solver="euler", batch_size=3)

    def refuse(fn, device, pool):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    den.net = GraphedNet(den.net, refuse)
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        out, _ = generate(den, 3, steps=2, solver="euler", batch_size=3)
    torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)
    assert den.net.failures == ["RuntimeError: operation not permitted when stream is capturing"]
    assert den.net.replays == 0 and den.net.eager_calls == 2  # tried once, then eager for that signature

def test_channels_last_keeps_the_samples():
    ref = fewstep.sample("digits", num=8, steps=2)["_samples"]
    den = load_model("digits")
    res = fewstep.sample(den, num=8, steps=2, channels_last=True)
    assert res["fast"] == {"channels_last": ["network"]}
    conv = next(m for m in den.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(res["_samples"], ref, rtol=1e-4, atol=1e-4)
    assert prepare_inference(den, channels_last=True) == {"channels_last": ["network"]}  # applied once


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from fewstep.teachers.random_pipelines import save_random_pipeline

    return save_random_pipeline("sdxl", tmp_path_factory.mktemp("sdxl") / "pipe")


def test_text_to_image_batches_prompt_cache_and_vae_options(tiny_sdxl, monkeypatch):
    den = load_model(tiny_sdxl)
    parts = den.components
    prompts = ["a red cube", "two cats", "a red cube"]
    encoded = []
    real_encode = parts._encode
    monkeypatch.setattr(parts, "_encode", lambda batch: encoded.append(list(batch)) or real_encode(batch))
    decoded = []
    real_decode = parts.decode
    monkeypatch.setattr(parts, "decode",
                        lambda z, batch_size=8: decoded.append((len(z), batch_size)) or real_decode(z, batch_size))
    one = fewstep.sample(den, num=7, steps=2, batch_size=1, prompts=prompts)
    assert encoded == [["a red cube", "two cats"]]  # each unique prompt once
    assert decoded == [(1, 1)] * 7  # the VAE decodes each sampling batch as it is made
    seven = fewstep.sample(den, num=7, steps=2, batch_size=7, prompts=prompts)
    assert encoded == [["a red cube", "two cats"]] and decoded[-1] == (7, 7)  # the second call reads the cache
    fewstep.sample(den, num=7, steps=1, batch_size=7, prompts=prompts, decode_batch_size=3)
    assert decoded[-1] == (7, 3)
    torch.testing.assert_close(one["_samples"], seven["_samples"], rtol=1e-5, atol=1e-5)
    assert one["_samples"].shape == (7, 3, 16, 16) and one["dtype"] == "fp32" and one["device"] == "cpu"
    fast = fewstep.sample(den, num=3, steps=2, batch_size=3, prompts=prompts, channels_last=True, vae_tiling=True)
    assert fast["fast"] == {"channels_last": ["network", "vae"], "vae_tiling": True} and parts.vae.use_tiling
    torch.testing.assert_close(fast["_samples"], one["_samples"][:3], rtol=1e-4, atol=1e-4)


def test_text_to_image_in_bf16_on_the_cpu(tiny_sdxl):
    ref = fewstep.sample(str(tiny_sdxl), num=2, steps=2, prompt="a red cube")
    res = fewstep.sample(str(tiny_sdxl), num=2, steps=2, prompt="a red cube", dtype="bf16")
    assert res["dtype"] == "bf16" and torch.isfinite(res["_samples"]).all()
    assert float((res["_samples"] - ref["_samples"]).abs().max()) < 0.1


def test_the_null_condition_follows_the_denoiser(tiny_sdxl):
    den = load_model(tiny_sdxl)
    den.to(torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for k, v in den._null_cond.items() if v.is_floating_point())


def test_prompt_cache_is_bounded_in_bytes(tiny_sdxl, monkeypatch):
    import fewstep.models.diffusers_pipeline as dp

    parts = load_model(tiny_sdxl).components
    one = sum(v.numel() * v.element_size() for v in parts.encode_prompts(["abc"], cache=False).values())
    assert "abc" not in parts._prompt_cache  # cache=False (conditions cached on disk by a run) keeps nothing
    monkeypatch.setattr(dp, "PROMPT_CACHE_BYTES", 2 * one)
    parts.encode_prompts(["abc", "abd"])
    parts.encode_prompts(["abc", "abe"])  # abc used again: abd is the least recent and goes
    assert list(parts._prompt_cache)[-2:] == ["abc", "abe"] and "abd" not in parts._prompt_cache
    assert parts._prompt_cache_bytes <= 2 * one


def test_finishing_pairs_in_another_dtype_is_refused_with_a_hint(tmp_path):
    fewstep.pairs("toy:moons", tmp_path / "p", num=8, steps=2, shard_size=4, dtype="fp32")
    with pytest.raises(FewstepError, match="another --dtype"):
        fewstep.pairs("toy:moons", tmp_path / "p", num=8, steps=2, shard_size=4, dtype="bf16")


def test_graphed_diffusers_network_and_vae_decoder(tiny_sdxl):
    """The text-to-image pieces `--cuda-graphs` wraps (the UNet with its dict of text conditions, the VAE decoder)
    replay through GraphedNet like the plain modules (eager stand-in for the graphs)."""
    from fewstep.sampling.fast import graphed_modules

    den = load_model(tiny_sdxl)
    kw = dict(num=5, steps=3, solver="euler", batch_size=5, prompts=["a red cube", "two cats"])
    plain = fewstep.sample(den, **kw)["_samples"]
    den.net = GraphedNet(den.net, eager_capture)
    den.components.vae.decoder = GraphedNet(den.components.vae.decoder, eager_capture)
    assert graphed_modules(den) == [den.net, den.components.vae.decoder]
    first = fewstep.sample(den, **kw)["_samples"]
    second = fewstep.sample(den, **kw)["_samples"]
    torch.testing.assert_close(first, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, plain, rtol=1e-5, atol=1e-5)
    assert den.net.replays == 5 and den.components.vae.decoder.replays == 1  # 6 UNet calls, 2 decodes
