"""Diffusers pipelines with random weights, built from configs offline (no hub): SD1.x/SD2.x-style (eps or v),
SDXL (two text encoders, text_time conditioning), SD3 (MMDiT transformer, flow matching) and Flux (FLUX.1-dev's
transformer: double and single stream blocks, packed 2x2 latents, rotary position ids, a guidance embedding).

``size="tiny"`` makes 16x16-pixel pipelines of a few hundred thousand parameters for tests and smoke runs;
``size="full"`` keeps the real UNet/transformer and VAE architectures (SDXL: the 2.6B-parameter UNet) with
shallow text encoders of the real widths, for memory and speed benchmarks. The tokenizer is a
hand-made CLIP BPE vocabulary of single letters (words tokenize letter by letter); it also stands in for the T5
tokenizers of SD3 and Flux (`FluxPipeline` only calls its tokenizer_2 like any tokenizer: padded to 512 tokens,
token ids, no T5-specific method), which saves, reloads and encodes offline.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from fewstep.errors import FewstepError

RANDOM_ARCHS = ("sd15", "sd2-v", "sdxl", "sd3", "flux")
SIZES = ("tiny", "full")


def letter_tokenizer(max_length: int | None = None):
    """A CLIPTokenizer over single letters, letters ending a word (`</w>`) and one merge ("th</w>");
    `max_length` sets its model_max_length (None: the tokenizer's own default)."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    vocab["th</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\nt h</w>\n")
        extra = {} if max_length is None else {"model_max_length": max_length}
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), **extra)


def _text_encoder(hidden: int, projection: int, layers: int, max_length: int, vocab: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64) if hidden >= 64 else 2,
                         max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         projection_dim=projection, hidden_act="gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _vae(size: str, latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    if size == "tiny":
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                             latent_channels=latent_channels, norm_num_groups=8, sample_size=16, layers_per_block=1,
                             **extra)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                         latent_channels=latent_channels, norm_num_groups=32, sample_size=1024, layers_per_block=2,
                         **extra)


def build_random_pipeline(arch: str, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A pipeline object of `arch` (sd15, sd2-v, sdxl, sd3, flux) with random weights drawn from `seed`."""
    from diffusers import (
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    if arch not in RANDOM_ARCHS:
        raise FewstepError(f"unknown architecture {arch!r}; allowed: {', '.join(RANDOM_ARCHS)}")
    if size not in SIZES:
        raise FewstepError(f"unknown size {size!r}; allowed: {', '.join(SIZES)}")
    tiny = size == "tiny"
    torch.manual_seed(seed)
    max_len = 16 if tiny else 77
    vocab = 64 if tiny else 49408
    tok = letter_tokenizer(max_len)
    if arch in ("sd15", "sd2-v"):
        hidden = 32 if tiny else (768 if arch == "sd15" else 1024)
        if tiny:
            unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                        block_out_channels=(16, 32),
                                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                        norm_num_groups=8, cross_attention_dim=hidden,
                                        use_linear_projection=arch == "sd2-v")
        else:
            unet = UNet2DConditionModel(sample_size=64 if arch == "sd15" else 96, cross_attention_dim=hidden,
                                        attention_head_dim=8 if arch == "sd15" else (5, 10, 20, 20),
                                        use_linear_projection=arch == "sd2-v")
        te = _text_encoder(hidden, hidden, 2, max_len, vocab, with_projection=False)
        sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, prediction_type="v_prediction" if arch == "sd2-v" else "epsilon")
        pipe = StableDiffusionPipeline(vae=_vae(size, scaling_factor=0.18215), text_encoder=te, tokenizer=tok,
                                       unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif arch == "sdxl":
        h1, h2, proj = (16, 16, 16) if tiny else (768, 1280, 1280)
        if tiny:
            unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                        block_out_channels=(16, 32),
                                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                        norm_num_groups=8, cross_attention_dim=h1 + h2, use_linear_projection=True,
                                        addition_embed_type="text_time", addition_time_embed_dim=8,
                                        projection_class_embeddings_input_dim=8 * 6 + proj)
        else:  # stabilityai/stable-diffusion-xl-base-1.0's UNet
            unet = UNet2DConditionModel(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
                                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                          "CrossAttnDownBlock2D"),
                                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                                        cross_attention_dim=2048, use_linear_projection=True,
                                        addition_embed_type="text_time", addition_time_embed_dim=256,
                                        projection_class_embeddings_input_dim=2816)
        te1 = _text_encoder(h1, h1, 2, max_len, vocab, with_projection=False)
        te2 = _text_encoder(h2, proj, 2, max_len, vocab, with_projection=True)
        sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(vae=_vae(size, scaling_factor=0.13025, force_upcast=True), text_encoder=te1,
                                         text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet,
                                         scheduler=sched, add_watermarker=False)
    elif arch == "flux":
        pipe = _flux_pipeline(tiny, tok, max_len, vocab)
    else:
        h, proj = (16, 16) if tiny else (768, 1280)
        if tiny:
            transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4,
                                                num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                                joint_attention_dim=2 * h, caption_projection_dim=16,
                                                pooled_projection_dim=2 * proj, pos_embed_max_size=16)
            latent = 4
        else:  # stabilityai/stable-diffusion-3-medium's transformer
            transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                                                num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                                joint_attention_dim=4096, caption_projection_dim=1536,
                                                pooled_projection_dim=2048, pos_embed_max_size=192)
            latent = 16
        from transformers import T5Config, T5EncoderModel

        te1 = _text_encoder(h, proj, 2, max_len, vocab, with_projection=True)
        te2 = _text_encoder(h if tiny else 1280, proj, 2, max_len, vocab, with_projection=True)
        d_model = 2 * h if tiny else 4096
        # a shallow T5 encoder of the width SD3 reads (the letter tokenizer stands in for T5's)
        te3 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=d_model, d_kv=8 if tiny else 64, d_ff=2 * d_model,
                                      num_layers=1 if tiny else 2, num_heads=4 if tiny else 64, pad_token_id=1,
                                      eos_token_id=1))
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sched,
                                        vae=_vae(size, latent, scaling_factor=1.5305, shift_factor=0.0609,
                                                 use_quant_conv=False, use_post_quant_conv=False),
                                        text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                        text_encoder_3=te3, tokenizer_3=letter_tokenizer(max_len))
    for module in pipe.components.values():  # as from_pretrained leaves them: no dropout (T5 has 0.1)
        if isinstance(module, torch.nn.Module):
            module.eval()
    if dtype != torch.float32:
        pipe.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux_pipeline(tiny: bool, tok, max_len: int, vocab: int):
    """FLUX.1-dev's layout: CLIP (pooled output only) and T5 text encoders, a FluxTransformer2DModel over 2x2-packed
    latents with a guidance embedding, the 16-channel VAE (4 channels when tiny) and dynamic-shift flow matching."""
    try:
        from diffusers import FluxPipeline, FluxTransformer2DModel
    except ImportError:
        import diffusers

        raise FewstepError(f"the installed diffusers {diffusers.__version__} lacks FluxPipeline / "
                           "FluxTransformer2DModel: install a newer diffusers for flux") from None
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    if tiny:
        latent, clip_hidden, d_model = 4, 16, 32
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * latent, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=d_model,
                                             pooled_projection_dim=clip_hidden, guidance_embeds=True,
                                             axes_dims_rope=(4, 6, 6))
    else:  # black-forest-labs/FLUX.1-dev's transformer (about 12B parameters)
        latent, clip_hidden, d_model = 16, 768, 4096
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * latent, num_layers=19,
                                             num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                                             joint_attention_dim=d_model, pooled_projection_dim=clip_hidden,
                                             guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    # FluxPipeline reads the CLIP encoder's pooler_output (a CLIPTextModel, as in FLUX.1-dev) and T5's hidden states
    te = _text_encoder(clip_hidden, clip_hidden, 2, max_len, vocab, with_projection=False)
    # a shallow T5 encoder of the width Flux reads (the letter tokenizer stands in for T5's)
    te2 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=d_model, d_kv=8 if tiny else 64, d_ff=2 * d_model,
                                  num_layers=1 if tiny else 2, num_heads=4 if tiny else 64, pad_token_id=1,
                                  eos_token_id=1))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    vae = _vae("tiny" if tiny else "full", latent, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
               use_post_quant_conv=False)
    return FluxPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                        tokenizer_2=letter_tokenizer(512), transformer=transformer)


def save_random_pipeline(arch: str, out: str | Path, size: str = "tiny", seed: int = 0, variant: str | None = None,
                         dtype: torch.dtype = torch.float32) -> Path:
    """Build `build_random_pipeline(arch, size, seed)` and save it as a pipeline folder (safetensors) at `out`."""
    out = Path(out)
    pipe = build_random_pipeline(arch, size, seed, dtype)
    pipe.save_pretrained(str(out), safe_serialization=True, variant=variant)
    return out


CAPTIONS = ("a red square", "a blue circle", "the green thing", "a cat on a mat", "two yellow dots", "a dark night")


def save_caption_folder(out: str | Path, captions=CAPTIONS, size: tuple[int, int] = (20, 24), seed: int = 0) -> Path:
    """A folder of random RGB images (height x width `size`) with their captions in metadata.jsonl (the Hugging
    Face imagefolder layout that `--data` reads), for smoke runs of methods that train on real images."""
    import numpy as np
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i, caption in enumerate(captions):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(out / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": caption}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out
