"""fewstep_kernels/diffusers_attention.py on a tiny diffusers UNet2DConditionModel built from a
config (offline): same outputs as the default processor, and torch.func.jvp through the whole
UNet (self- and cross-attention) without the SDPA MATH backend, against central differences."""

from __future__ import annotations

import copy

import pytest
import torch
from fewstep_kernels import FewstepJVPAttnProcessor, install_fewstep_attention

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def built_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
        attention_head_dim=2, norm_num_groups=16,
    ).eval()


@pytest.fixture
def unet(built_unet):
    """A fresh copy with the default processors."""
    return copy.deepcopy(built_unet)


def inputs(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    t = torch.tensor([10.0, 500.0], dtype=dtype)
    context = torch.randn(2, 7, 24, generator=g, dtype=torch.float64).to(dtype)  # 7 tokens: Lq != Lk
    return x, t, context


def test_install_replaces_every_processor(unet):
    n = install_fewstep_attention(unet)
    procs = unet.attn_processors
    # self- and cross-attention in 4 transformer blocks: 1 down, 1 mid, 2 up
    assert n == len(procs) == 8
    assert all(isinstance(p, FewstepJVPAttnProcessor) for p in procs.values())


def test_outputs_match_the_default_processor(unet):
    x, t, context = inputs()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False  # padded text tokens in the second prompt
    with torch.no_grad():
        ref = unet(x, t, context).sample
        ref_masked = unet(x, t, context, encoder_attention_mask=mask).sample
        install_fewstep_attention(unet)
        out = unet(x, t, context).sample
        out_masked = unet(x, t, context, encoder_attention_mask=mask).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_masked, ref_masked, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_masked, out, atol=1e-4)  # the mask mattered


def test_func_jvp_through_the_unet_matches_finite_differences(unet):
    unet = unet.double()
    install_fewstep_attention(unet, backend="reference")
    x, t, context = inputs(torch.float64)
    g = torch.Generator().manual_seed(2)
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    dc = torch.randn(context.shape, generator=g, dtype=torch.float64)

    def f(a, c):
        return unet(a, t, c).sample

    out, tangent = torch.func.jvp(f, (x, context), (dx, dc))
    h = 1e-6
    fd = (f(x + h * dx, context + h * dc) - f(x - h * dx, context - h * dc)) / (2 * h)
    torch.testing.assert_close(out, f(x, context))
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)


def test_install_rejects_unknown_backend_and_models_without_attention():
    with pytest.raises(ValueError, match="unknown attention backend"):
        FewstepJVPAttnProcessor("flash3")
    with pytest.raises(ValueError, match="no attention layers"):
        install_fewstep_attention(torch.nn.Linear(2, 2))
