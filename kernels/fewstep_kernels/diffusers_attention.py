"""A diffusers attention processor that routes attention through `fewstep_kernels.attention`.

`FewstepJVPAttnProcessor` has the call signature of diffusers' `AttnProcessor2_0`
(`__call__(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None)`) and
computes the same thing, but its softmax attention is `fewstep_kernels.attention`: forward-mode AD
through a diffusers UNet or transformer works on CPU (no SDPA MATH backend needed) and uses the fused
flash-attention JVP kernel on CUDA. With an attention mask it falls back to plain math attention
(differentiable in both modes, O(Lq * Lk) memory); the kernel has no mask.

`install_fewstep_attention(model)` puts it on every attention layer of a diffusers model.
"""

from __future__ import annotations

import torch

from fewstep_kernels.attention import BACKENDS, attention


def masked_math_attention(q, k, v, mask, scale):
    """softmax(q k^T * scale + mask) v; a boolean mask keeps True positions (SDPA's convention)."""
    s = (q @ k.transpose(-1, -2)) * scale
    if mask.dtype == torch.bool:
        s = s.masked_fill(~mask, float("-inf"))
    else:
        s = s + mask.to(s.dtype)
    return torch.softmax(s, dim=-1) @ v


class FewstepJVPAttnProcessor:
    """diffusers attention processor (same steps as `AttnProcessor2_0`) on `fewstep_kernels.attention`.

    backend: "auto" (the Triton kernel for CUDA inputs it supports, PyTorch otherwise), "triton" or
    "reference". The attention scale is `attn.scale` (1/sqrt(head dim) unless the layer says otherwise).
    """

    def __init__(self, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend = backend

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scale = getattr(attn, "scale", None)
        if attention_mask is None:
            hidden_states = attention(query, key, value, scale=scale, backend=self.backend)
        else:
            scale = head_dim**-0.5 if scale is None else scale
            hidden_states = masked_math_attention(query, key, value, attention_mask, scale)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_fewstep_attention(model, backend: str = "auto") -> int:
    """Set `FewstepJVPAttnProcessor(backend)` on every attention layer of a diffusers model
    (`model.set_attn_processor`); returns how many layers got it.

    Only layers of diffusers' classic `Attention` class are supported (UNet2DModel, UNet2DConditionModel,
    SD/SDXL transformer blocks); a model with other attention classes raises ValueError.
    """
    from diffusers.models.attention_processor import Attention

    layers = {name: m for name, m in model.named_modules() if hasattr(m, "set_processor")}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention layers with processors")
    other = sorted({type(m).__name__ for m in layers.values() if not isinstance(m, Attention)})
    if other:
        raise ValueError(f"FewstepJVPAttnProcessor supports diffusers' Attention layers only, "
                         f"not {', '.join(other)}")
    model.set_attn_processor(FewstepJVPAttnProcessor(backend))
    return len(layers)
