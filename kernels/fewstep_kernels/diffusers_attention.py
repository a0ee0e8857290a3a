"""fewstep's attention inside diffusers models: every attention layout they use, through one function.

- `sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)` takes
  `F.scaled_dot_product_attention`'s arguments and computes the same thing with `fewstep_kernels.attention`
  (the fused JVP kernel on CUDA); masks (boolean or additive, and is_causal) go through plain math attention
  in float32 (differentiable in both modes, O(Lq * Lk) memory; the kernel has no mask).
- `kernel_attention(modules)`: while open, every attention layer of the diffusers models in `modules` attends
  through `sdpa`. Layers are checked by their processor: those in `SDPA_PROCESSORS` (self and cross attention,
  SD3's joint attention, Flux's joint attention with rotary embeddings, their fused-QKV variants) make one
  `F.scaled_dot_product_attention` call on (B, H, L, D) tensors, directly or through diffusers'
  `dispatch_attention_fn` on its native backend, after their own projections, norms, rotary embeddings and
  concatenation, and before their own split; that call is routed to `sdpa`. Classic `AttnProcessor` layers
  (attention by baddbmm) get `FewstepJVPAttnProcessor` while the context is open. A layer with any other processor
  is a ValueError naming it: an unknown processor might attend some other way, and the kernel would then
  silently not run (or run on the wrong thing).
- `FewstepJVPAttnProcessor` has the call signature of diffusers' `AttnProcessor2_0` and computes the same
  thing through `sdpa`; `install_fewstep_attention(model)` puts it on every attention layer of a model.
"""

from __future__ import annotations

import contextlib

import torch

from fewstep_kernels.attention import BACKENDS, attention, record_backend, use_backend
from fewstep_kernels.reference import compute_dtype, default_scale

# processors whose attention is one scaled_dot_product_attention call (see the module docstring)
SDPA_PROCESSORS = frozenset({
    "AttnProcessor2_0", "FusedAttnProcessor2_0",  # SD1.x/SD2.x/SDXL UNets, DiT, UNet2DModel
    "JointAttnProcessor2_0", "FusedJointAttnProcessor2_0",  # SD3 / SD3.5 (MMDiT)
    "FluxAttnProcessor", "FluxAttnProcessor2_0", "FusedFluxAttnProcessor2_0",  # Flux
    "FewstepJVPAttnProcessor",
})
# processors that attend by other means and are swapped for FewstepJVPAttnProcessor (same computation)
SWAPPED_PROCESSORS = frozenset({"AttnProcessor"})


def masked_math_attention(q, k, v, mask, scale):
    """softmax(q k^T * scale + mask) v in float32 (or wider), returned in q's dtype; a boolean mask keeps True
    positions (SDPA's convention); the mask broadcasts against (..., Lq, Lk)."""
    ct = compute_dtype(q.dtype)
    s = (q.to(ct) @ k.to(ct).transpose(-1, -2)) * scale
    if mask.dtype == torch.bool:
        s = s.masked_fill(~mask, float("-inf"))
    else:
        s = s + mask.to(ct)
    return (torch.softmax(s, dim=-1) @ v.to(ct)).to(q.dtype)


def sdpa(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None,
         enable_gqa: bool = False, *, backend: str = "auto"):
    """`F.scaled_dot_product_attention` on fewstep's attention (see the module docstring). Dropout is refused:
    fewstep runs these paths on networks in eval mode."""
    if dropout_p:
        raise ValueError(f"fewstep's attention has no dropout (dropout_p={dropout_p}); run the model in eval mode")
    if enable_gqa and key.shape[-3] != query.shape[-3]:  # grouped-query attention: share each k/v head
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
    scale = default_scale(query.shape[-1]) if scale is None else float(scale)
    if is_causal:
        if attn_mask is not None:
            raise ValueError("scaled_dot_product_attention takes attn_mask or is_causal, not both")
        lq, lk = query.shape[-2], key.shape[-2]
        attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        record_backend("masked")
        return masked_math_attention(query, key, value, attn_mask, scale)
    return attention(query, key, value, scale=scale, backend=backend)


@contextlib.contextmanager
def route_sdpa(backend: str = "auto"):
    """`torch.nn.functional.scaled_dot_product_attention` is `sdpa(..., backend=backend)` while the context is
    open. It is a module attribute, so the swap is seen by every thread of the process: open it around a
    single-threaded pass (fewstep's JVPs), not around code other threads run at the same time."""
    import torch.nn.functional as F

    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    original = F.scaled_dot_product_attention

    def routed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend=backend)

    F.scaled_dot_product_attention = routed
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def attention_layers(modules) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) for every diffusers attention layer (a module with a swappable `processor`) in `modules`."""
    found, seen = [], set()
    for root in modules:
        for name, m in root.named_modules():
            if hasattr(m, "set_processor") and getattr(m, "processor", None) is not None and id(m) not in seen:
                seen.add(id(m))
                found.append((name, m))
    return found


def check_processors(modules) -> None:
    """ValueError naming every processor of `modules`' attention layers that `kernel_attention` does not know."""
    unknown: dict[str, tuple[str, str]] = {}
    for name, m in attention_layers(modules):
        proc = type(m.processor).__name__
        if proc not in SDPA_PROCESSORS and proc not in SWAPPED_PROCESSORS:
            unknown.setdefault(proc, (name, type(m).__name__))
    if unknown:
        said = "; ".join(f"{proc} (layer {name or '<root>'}, a {cls})" for proc, (name, cls) in unknown.items())
        raise ValueError(f"fewstep's attention kernel does not know the attention processor {said}; known: "
                         f"{', '.join(sorted(SDPA_PROCESSORS | SWAPPED_PROCESSORS))}")


@contextlib.contextmanager
def kernel_attention(modules, backend: str = "auto"):
    """Every attention layer of the diffusers models in `modules` attends through `sdpa(..., backend=backend)`
    while the context is open (module docstring), and `attention(..., backend="auto")` calls resolve as `backend`
    (`use_backend`); processors and attention backends come back afterwards, also after an exception."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_processors(modules)
    layers = [m for _, m in attention_layers(modules)]
    saved = [(m, m.processor) for m in layers]
    # a processor pinned to another diffusers attention backend (flash-attn, sage, ...) would bypass SDPA
    pinned = [(m.processor, m.processor._attention_backend) for m in layers
              if getattr(m.processor, "_attention_backend", None) is not None]
    with contextlib.ExitStack() as stack:
        try:
            swapped = FewstepJVPAttnProcessor(backend)
            for m in layers:
                if type(m.processor).__name__ in SWAPPED_PROCESSORS:
                    m.set_processor(swapped)
            for proc, _ in pinned:
                proc._attention_backend = None
            if layers:
                try:
                    from diffusers.models.attention_dispatch import attention_backend
                except ImportError:  # older diffusers: processors call SDPA directly
                    pass
                else:
                    stack.enter_context(attention_backend("native"))
            stack.enter_context(route_sdpa(backend))
            stack.enter_context(use_backend(backend))  # direct attention() calls (the built-in UNet) follow too
            yield
        finally:
            for m, proc in saved:
                if m.processor is not proc:
                    m.set_processor(proc)
            for proc, name in pinned:
                proc._attention_backend = name


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

        hidden_states = sdpa(query, key, value, attention_mask, scale=getattr(attn, "scale", None),
                             backend=self.backend)

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
    SD/SDXL transformer blocks); a model with other attention classes raises ValueError (`kernel_attention`
    covers those: SD3's joint and Flux's rotary attention keep their processors there).
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
