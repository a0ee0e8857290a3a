"""Triton kernels for fewstep, importable as ``fewstep_kernels``.

The folder is the repository's top-level ``kernels/``, but it is installed under this project
name: a top-level module called ``kernels`` would be picked up by transformers' probe for the
Hugging Face ``kernels`` package.

- `attention(q, k, v, scale=None, backend="auto")`: softmax attention on (B, H, L, D) tensors whose
  forward-mode JVP (torch.func.jvp, forward_ad) is one fused flash pass.
- `attention_jvp(q, k, v, tq, tk, tv, scale=None, backend="auto") -> (o, to)`.
- `sdpa(q, k, v, attn_mask=None, ...)`: `F.scaled_dot_product_attention`'s signature on the same.
- `kernel_attention(modules)`: every attention layer of diffusers models (self, cross, SD3's joint, Flux's
  rotary attention) attends through `sdpa` while open; unknown processors are a ValueError.
- `FewstepJVPAttnProcessor` / `install_fewstep_attention(model)`: a processor for classic attention layers.
- `count_backends()`: which attention paths ran (triton, reference, masked) while open; `use_backend(name)`:
  `attention(..., backend="auto")` resolves as `name` while open.

Backends: the Triton kernel for CUDA tensors, a chunked PyTorch reference elsewhere; Triton is
imported on first use of the kernel, and only if installed.
"""

from fewstep_kernels.attention import (
    BACKENDS,
    TRITON_AVAILABLE,
    FlashAttentionJVP,
    attention,
    attention_jvp,
    count_backends,
    resolve_backend,
    use_backend,
)
from fewstep_kernels.diffusers_attention import (
    SDPA_PROCESSORS,
    FewstepJVPAttnProcessor,
    install_fewstep_attention,
    kernel_attention,
    sdpa,
)

__all__ = [
    "BACKENDS",
    "SDPA_PROCESSORS",
    "TRITON_AVAILABLE",
    "FewstepJVPAttnProcessor",
    "FlashAttentionJVP",
    "attention",
    "attention_jvp",
    "count_backends",
    "install_fewstep_attention",
    "kernel_attention",
    "resolve_backend",
    "sdpa",
    "use_backend",
]
