"""Triton kernels for fewstep, importable as ``fewstep_kernels``.

The folder is the repository's top-level ``kernels/``, but it is installed under this project
name: a top-level module called ``kernels`` would be picked up by transformers' probe for the
Hugging Face ``kernels`` package.

- `attention(q, k, v, scale=None, backend="auto")`: softmax attention on (B, H, L, D) tensors whose
  forward-mode JVP (torch.func.jvp, forward_ad) is one fused flash pass.
- `attention_jvp(q, k, v, tq, tk, tv, scale=None, backend="auto") -> (o, to)`.
- `FewstepJVPAttnProcessor` / `install_fewstep_attention(model)`: the same for diffusers models.

Backends: the Triton kernel for CUDA tensors, a chunked PyTorch reference elsewhere; Triton is
imported on first use of the kernel, and only if installed.
"""

from fewstep_kernels.attention import (
    BACKENDS,
    TRITON_AVAILABLE,
    FlashAttentionJVP,
    attention,
    attention_jvp,
    resolve_backend,
)
from fewstep_kernels.diffusers_attention import FewstepJVPAttnProcessor, install_fewstep_attention

__all__ = [
    "BACKENDS",
    "TRITON_AVAILABLE",
    "FewstepJVPAttnProcessor",
    "FlashAttentionJVP",
    "attention",
    "attention_jvp",
    "install_fewstep_attention",
    "resolve_backend",
]
