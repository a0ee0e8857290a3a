"""Networks and the Denoiser wrapper."""

from fewstep.models.denoiser import Denoiser, cat_conds, cond_batch_size

__all__ = ["Denoiser", "cat_conds", "cond_batch_size"]
