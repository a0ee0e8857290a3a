"""Triton kernels for fewstep, importable as ``fewstep_kernels``.

The folder is the repository's top-level ``kernels/``, but it is installed under this project
name: a top-level module called ``kernels`` would be picked up by transformers' probe for the
Hugging Face ``kernels`` package. The flash-attention-with-JVP kernel lands here in its own issue.
"""

__all__: list[str] = []
