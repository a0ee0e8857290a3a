"""Diffusers networks as fewstep Denoisers (tiny random SDXL, SD2-v, SD3 and Flux pipelines built from configs):
the process/prediction conventions against the stock pipelines' own samplers, LoRA students on shared
weights, full copies, the guidance input (LCM's, Flux's embedded guidance), merging for export, bottleneck
features, Flux's latent packing."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fewstep.models.diffusers_nets import (
    LoraDiffusersNet,
    guidance_scale_embedding,
    share_weights_copy,
)
from fewstep.models.gan import DiscriminatorHead, capture_features, feature_layer
from fewstep.sampling import generate, sample_seeds
from fewstep.teachers import load_teacher
from fewstep.teachers.random_pipelines import save_random_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a cat", "the red thing", ""]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {arch: save_random_pipeline(arch, root / arch) for arch in ("sdxl", "sd2-v", "sd3", "flux")}


@pytest.fixture(scope="module")
def sdxl(pipelines):
    return load_teacher(pipelines["sdxl"])


def _inputs(den, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *den.data_shape, generator=g)
    t = torch.tensor([999.0, 500.0, 20.0])[:n] if den.process.name == "vp" else torch.tensor([1.0, 0.5, 0.05])[:n]
    return x, t, den.components.encode_prompts(PROMPTS[:n])


def test_sdxl_adapter_is_the_unet_call(sdxl):
    x, t, cond = _inputs(sdxl)
    assert set(cond) == {"prompt_embeds", "text_embeds", "time_ids"}
    assert cond["time_ids"][0].tolist() == [16, 16, 0, 0, 16, 16]
    unet = sdxl.components.pipe.unet
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=cond["prompt_embeds"],
                   added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample
        torch.testing.assert_close(sdxl.raw(x, t, cond), ref, rtol=0, atol=0)
    assert sdxl.prediction == "eps" and sdxl.process.config()["beta_schedule"] == "scaled_linear"
    assert sdxl.data_shape == (4, 8, 8) and sdxl.cond_kind == "text"
    # SDXL's force_zeros_for_empty_prompt: the null condition is zeros (with the same micro-conditioning)
    null = sdxl.null_condition(2)
    assert float(null["prompt_embeds"].abs().sum()) == 0 and null["time_ids"].shape == (2, 6)
    assert sdxl.meta["default_spacing"] == "trailing" and sdxl.meta["noise_stream"] == "sequential"


@pytest.mark.parametrize("arch", ["sdxl", "sd2-v", "sd3", "flux"])
def test_teacher_euler_sampler_matches_the_stock_pipeline(pipelines, arch):
    """fewstep's Euler (DDIM; trailing timesteps for VP; flow times 1, 3/4, 1/2, 1/4) with CFG equals the stock
    pipeline with DDIMScheduler(trailing) / FlowMatchEuler(shift 1): same latents from the same generators.
    Flux: FluxPipeline with its dynamic shift off and guidance_scale 3 fed to the guidance embedding (no CFG pass);
    its packed latents unpacked to fewstep's (B, C, H, W).
    (diffusers' trailing EulerDiscreteScheduler starts from sigma_max instead of sqrt(1 + sigma_max^2) times the
    noise: 0.2% off at SD's sigma_max = 14.6, so it is not the reference here.)"""
    from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    den = load_teacher(pipelines[arch])
    pipe = DiffusionPipeline.from_pretrained(str(pipelines[arch]))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a cat", "the red thing"]
    ours, _ = generate(den, 2, steps=4, solver="euler", spacing=den.meta["default_spacing"], seed=3, guidance=3.0,
                       cond=den.components.encode_prompts(prompts))
    gens = [torch.Generator().manual_seed(s) for s in sample_seeds(3, 0, 2)]
    if arch == "sd3":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
        theirs = pipe(prompts, sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=3.0, generator=gens,
                      output_type="latent").images
    elif arch == "flux":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0,
                                                                     use_dynamic_shifting=False)
        packed = pipe(prompts, sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=3.0, generator=gens, height=16,
                      width=16, output_type="latent").images
        theirs = pipe._unpack_latents(packed, 16, 16, pipe.vae_scale_factor)
    else:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                   set_alpha_to_one=True, clip_sample=False)
        theirs = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, generator=gens, output_type="latent").images
    assert den.prediction == {"sdxl": "eps", "sd2-v": "v", "sd3": "flow", "flux": "flow"}[arch]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)  # float64 vs float32 schedule tables
    assert float(ours.std()) > 0.1


def test_lora_student_shares_the_teacher_weights(sdxl):
    torch.manual_seed(0)
    net = sdxl.net.derive(lora_rank=4)
    assert isinstance(net, LoraDiffusersNet)
    base_ptrs = {p.data_ptr() for p in sdxl.net.parameters()}
    tree_ptrs = {p.data_ptr() for n, p in net.live.named_parameters() if "lora_" not in n}
    assert tree_ptrs == base_ptrs  # one copy of the base weights in memory
    names = [n for n, _ in net.named_parameters()]
    assert names and all(n.startswith("lora.") for n in names)  # only the adapter is a parameter
    assert sum(p.numel() for p in net.parameters()) < 0.2 * sum(p.numel() for p in sdxl.net.parameters())
    x, t, cond = _inputs(sdxl)
    with torch.no_grad():
        before = sdxl.net(x, t, cond)
        torch.testing.assert_close(net(x, t, cond), before, rtol=0, atol=0)  # LoRA B starts at zero
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        moved = net(x, t, cond)
        assert float((moved - before).abs().max()) > 1e-3
        torch.testing.assert_close(sdxl.net(x, t, cond), before, rtol=0, atol=0)  # the teacher is untouched
    # gradients reach the adapter only
    net(x, t, cond).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert all(p.grad is None for p in sdxl.net.parameters())


def test_lora_deep_copy_is_a_new_adapter_on_the_same_base(sdxl):
    torch.manual_seed(0)
    net = sdxl.net.derive(lora_rank=2, guidance_embed=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    state = torch.get_rng_state()
    twin = copy.deepcopy(net)
    assert torch.equal(torch.get_rng_state(), state)  # a copy draws nothing from the run's random streams
    assert twin.live is not net.live
    assert {p.data_ptr() for n, p in twin.live.named_parameters() if "lora_" not in n and "cond_proj" not in n} == {
        p.data_ptr() for p in sdxl.net.parameters()}
    x, t, cond = _inputs(sdxl)
    w = torch.tensor([1.0, 4.0, 8.0])
    with torch.no_grad():
        torch.testing.assert_close(twin(x, t, cond, guidance=w), net(x, t, cond, guidance=w), rtol=0, atol=0)
        for p in twin.parameters():
            p.mul_(0.0)
        assert not torch.allclose(twin(x, t, cond, guidance=w), net(x, t, cond, guidance=w))
    assert [k for k in twin.state_dict()] == [k for k in net.state_dict()]


def test_full_copy_is_independent(sdxl):
    net = sdxl.net.derive()
    assert net.role == "full" and {p.data_ptr() for p in net.parameters()}.isdisjoint(
        {p.data_ptr() for p in sdxl.net.parameters()})
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in sdxl.net.parameters())


def test_guidance_input_matches_the_pipelines_embedding(sdxl):
    w = torch.tensor([1.0, 2.5, 9.0])
    ref = sdxl.components.pipe.get_guidance_scale_embedding(w, embedding_dim=256)
    torch.testing.assert_close(guidance_scale_embedding(w, 256), ref, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    net = sdxl.net.derive(guidance_embed=True)
    x, t, cond = _inputs(sdxl)
    with torch.no_grad():  # zero-initialised: the student starts as the teacher whatever w
        torch.testing.assert_close(net(x, t, cond, guidance=w), sdxl.net(x, t, cond), rtol=0, atol=0)


@pytest.mark.parametrize("lora_rank", [None, 3])
def test_standalone_model_is_the_student(sdxl, lora_rank):
    """The exported UNet (LoRA merged; a UNet config with time_cond_proj_dim) computes what the student does,
    fed the guidance embedding of w - 1 the way stock pipelines feed it."""
    torch.manual_seed(0)
    net = sdxl.net.derive(lora_rank=lora_rank, guidance_embed=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    unet = net.standalone_model()
    assert unet.config.time_cond_proj_dim == 256
    x, t, cond = _inputs(sdxl)
    w = torch.tensor([2.0, 5.0, 1.0])
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=cond["prompt_embeds"],
                   timestep_cond=guidance_scale_embedding(w - 1, 256),
                   added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample
        torch.testing.assert_close(net(x, t, cond, guidance=w), ref, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(sdxl):
    x, t, cond = _inputs(sdxl)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = sdxl.net.derive(lora_rank=2, gradient_checkpointing=ckpt)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05)
        other = sdxl.net.derive(lora_rank=2)  # another adapter used in between must not leak into the recompute
        loss = net(x, t, cond).square().mean() + other(x, t, cond).detach().mean()
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert not sdxl.components.pipe.unet.down_blocks[1].gradient_checkpointing  # the teacher's tree is not touched
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_capture_features_reads_the_bottleneck(sdxl, pipelines):
    torch.manual_seed(0)
    student = copy.deepcopy(sdxl)
    student.net = sdxl.net.derive(lora_rank=2)
    x, t, cond = _inputs(sdxl)
    x.requires_grad_(True)
    with capture_features(feature_layer(student)) as feats:
        student(x, t, cond)
    assert feats["features"].shape == (3, 32, 4, 4)
    DiscriminatorHead((32, 4, 4))(feats["features"]).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    sd3 = load_teacher(pipelines["sd3"])
    xs, ts, cs = _inputs(sd3)
    with torch.no_grad(), capture_features(feature_layer(sd3)) as feats:
        sd3(xs, ts, cs)
    assert feats["features"].shape == (3, 16, 16)  # (B, tokens, dim): the joint block's image tokens
    assert DiscriminatorHead((16, 16))(feats["features"]).shape == (3,)


def test_share_weights_copy_builds_new_modules_over_the_same_tensors(sdxl):
    unet = sdxl.components.pipe.unet
    tree = share_weights_copy(unet)
    assert tree is not unet and tree.mid_block is not unet.mid_block
    assert all(a is b for a, b in zip(tree.parameters(), unet.parameters(), strict=True))


def test_sd3_has_no_guidance_input(pipelines):
    from fewstep.errors import FewstepError

    sd3 = load_teacher(pipelines["sd3"])
    assert sd3.process.name == "flow" and sd3.meta["flow_shift"] == 3.0
    with pytest.raises(FewstepError, match="guidance_embed=false"):
        sd3.net.derive(lora_rank=2, guidance_embed=True)


# -- Flux ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux(pipelines):
    return load_teacher(pipelines["flux"])


def test_flux_packing_is_the_pipelines_and_round_trips():
    from diffusers import FluxPipeline

    from fewstep.models.diffusers_nets import latent_image_ids, pack_latents, unpack_latents

    x = torch.randn(3, 4, 6, 10)
    tokens = pack_latents(x)
    assert tokens.shape == (3, 15, 16)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(x, 3, 4, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(tokens, 6, 10), x, rtol=0, atol=0)
    # FluxPipeline._unpack_latents takes pixels: a VAE factor of 2 gives the same 6x10 latent grid
    torch.testing.assert_close(FluxPipeline._unpack_latents(tokens, 12, 20, 2), x, rtol=0, atol=0)
    torch.testing.assert_close(latent_image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(3, 3, 5, "cpu",
                                                                                                torch.float32))
    from fewstep.errors import FewstepError

    with pytest.raises(FewstepError, match="must be even"):
        pack_latents(torch.randn(1, 4, 5, 6))


def test_flux_teacher_is_the_transformer_call_with_embedded_guidance(flux):
    """The net packs the latents, passes flow time t (the transformer multiplies by 1000), FluxPipeline's ids and
    the guidance scale w to the guidance embedding, and unpacks the velocity; the Denoiser never runs a CFG pass."""
    from diffusers import FluxPipeline

    assert flux.data_shape == (4, 8, 8) and flux.meta["resolution"] == [16, 16]  # the VAE's sample_size
    assert flux.process.name == "flow" and flux.prediction == "flow" and flux.guidance_embedded
    assert flux.meta["default_guidance"] == 3.5 and flux.meta["default_steps"] == 28
    # FluxPipeline's shift at this resolution: mu from 16 tokens, exp(mu) as SD3-style shift
    mu = 0.5 + (1.15 - 0.5) * (16 - 256) / (4096 - 256)
    assert flux.meta["flow_shift_mu"] == pytest.approx(mu) and flux.meta["flow_shift"] == pytest.approx(math.exp(mu))
    x, t, cond = _inputs(flux)
    assert set(cond) == {"prompt_embeds", "pooled_prompt_embeds"} and cond["prompt_embeds"].shape == (3, 512, 32)
    w = torch.tensor([3.5, 1.0, 6.0])
    model = flux.components.pipe.transformer
    with torch.no_grad():
        ref = model(hidden_states=FluxPipeline._pack_latents(x, 3, 4, 8, 8), timestep=t, guidance=w,
                    encoder_hidden_states=cond["prompt_embeds"], pooled_projections=cond["pooled_prompt_embeds"],
                    txt_ids=torch.zeros(512, 3), img_ids=FluxPipeline._prepare_latent_image_ids(3, 4, 4, "cpu",
                                                                                                torch.float32)).sample
        ref = FluxPipeline._unpack_latents(ref, 16, 16, 2)
        torch.testing.assert_close(flux.raw(x, t, cond, guidance=w), ref, rtol=0, atol=0)
        assert float((flux.raw(x, t, cond, guidance=torch.full((3,), 7.0)) - ref).abs().max()) > 1e-4
        calls = []
        handle = flux.net.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
        try:
            x0 = flux(x, t, cond, guidance=3.5)
        finally:
            handle.remove()
        assert calls == [3]  # one pass: no unconditional half
        torch.testing.assert_close(x0, x - t.view(3, 1, 1, 1) * flux.raw(x, t, cond, guidance=3.5))  # v = eps - x0
        # called with no guidance, the net takes FluxPipeline's default 3.5
        torch.testing.assert_close(flux.net(x, t, cond), flux.raw(x, t, cond, guidance=3.5), rtol=0, atol=0)


def test_flux_lora_reaches_double_and_single_blocks_and_keeps_the_guidance_input(flux):
    torch.manual_seed(0)
    net = flux.net.derive(lora_rank=2)
    assert net.guidance_embed and not len(net.extra)  # the transformer's own input; nothing added
    names = list(net.lora)
    assert any(n.startswith("transformer_blocks__0__attn__add_q_proj") for n in names)
    assert any(n.startswith("single_transformer_blocks__0__attn__to_q") for n in names)
    assert {p.data_ptr() for n, p in net.live.named_parameters() if "lora_" not in n} == {
        p.data_ptr() for p in flux.net.parameters()}
    x, t, cond = _inputs(flux)
    w = torch.tensor([3.5, 2.0, 1.0])
    with torch.no_grad():
        before = flux.net(x, t, cond, guidance=w)
        torch.testing.assert_close(net(x, t, cond, guidance=w), before, rtol=0, atol=0)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        student = net.standalone_model()  # merged: a FluxTransformer2DModel with guidance_embeds, no new layers
        assert student.config.guidance_embeds and type(student).__name__ == "FluxTransformer2DModel"
        merged = flux.net.derive()
        merged.model.load_state_dict(student.state_dict())
        torch.testing.assert_close(merged(x, t, cond, guidance=w), net(x, t, cond, guidance=w), rtol=1e-4,
                                   atol=1e-5)
        assert float((net(x, t, cond, guidance=w) - before).abs().max()) > 1e-4
    net(x, t, cond, guidance=w).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert set(net.lora_state_dict()) and all("lora_" in k for k in net.lora_state_dict())
    with torch.no_grad(), capture_features(feature_layer(flux)) as feats:  # the middle of double + single blocks
        flux(x, t, cond, guidance=3.5)
    assert feature_layer(flux) is flux.components.pipe.transformer.single_transformer_blocks[0]
    assert feats["features"].shape == (3, 16, 32)  # (B, image tokens, width)


def test_flux_without_guidance_embeds_is_guided_with_cfg(pipelines):
    """A Flux transformer without guidance_embeds (FLUX.1-schnell's layout) has no guidance input: no default
    guidance, CFG with the empty prompt as FluxPipeline's true CFG does, and LCM's guidance input is refused."""
    from diffusers import DiffusionPipeline, FluxTransformer2DModel

    from fewstep.errors import FewstepError
    from fewstep.models.diffusers_pipeline import denoiser_from_pipeline

    pipe = DiffusionPipeline.from_pretrained(str(pipelines["flux"]))
    pipe.transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, "guidance_embeds": False})
    den = denoiser_from_pipeline(pipe, "schnell-like")
    assert not den.guidance_embedded and "default_guidance" not in den.meta
    x, t, cond = _inputs(den)
    with torch.no_grad():
        c, u = den.raw(x, t, cond), den.raw(x, t, den.null_condition(3))
        torch.testing.assert_close(den(x, t, cond, guidance=2.0, kind="flow"), u + 2.0 * (c - u), rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(FewstepError, match="guidance_embed=false"):
        den.net.derive(lora_rank=2, guidance_embed=True)
