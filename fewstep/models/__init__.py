"""Networks and the Denoiser wrapper."""

from fewstep.models.denoiser import Denoiser, cat_conds, cond_batch_size
from fewstep.models.io import load_denoiser, save_denoiser
from fewstep.models.mlp import MLPNet
from fewstep.models.networks import NETWORKS, build_network
from fewstep.models.unet import UNetNet

__all__ = ["Denoiser", "MLPNet", "NETWORKS", "UNetNet", "build_network", "cat_conds", "cond_batch_size",
           "load_denoiser", "save_denoiser"]
