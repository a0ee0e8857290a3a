"""JVP backends (fewstep.models.jvp): kernel, func and fd agree with each other (fp64) on a small UNet and a
small transformer, through the TrigFlow view of a Denoiser; auto picks forward-mode AD where it runs and falls
back (kernel -> func -> fd) where it does not; finite differences are second order and RNG-consistent."""

from __future__ import annotations

import math
import warnings

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from fewstep.diffusion import RectifiedFlow
from fewstep.models import Denoiser, MLPNet, UNetNet
from fewstep.models.embeddings import sinusoidal_embedding
from fewstep.models.jvp import JVP, jvp
from fewstep.models.trigflow import TrigFlowDenoiser

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class TinyDiT(nn.Module):
    """A DiT-like transformer for (B, C, 8, 8) images: 2x2 patches, adaLN-modulated blocks whose self-attention
    is a diffusers Attention layer (so "kernel" can route it through fewstep's attention), fp64-exact time input."""

    def __init__(self, channels=1, dim=32, depth=2, heads=2, patch=2, size=8, num_classes=None):
        super().__init__()
        self.patch, self.size = patch, size
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, (size // patch) ** 2, dim))
        self.time = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict({
                "norm1": nn.LayerNorm(dim, elementwise_affine=False),
                "attn": Attention(dim, heads=heads, dim_head=dim // heads),
                "norm2": nn.LayerNorm(dim, elementwise_affine=False),
                "mlp": nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
                "ada": nn.Linear(dim, 4 * dim)}))
        self.out = nn.Linear(dim, channels * patch * patch)

    def forward(self, x, t, cond=None):
        b, c, h, w = x.shape
        p = self.patch
        tokens = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        hid = self.embed(tokens) + self.pos.to(x.dtype)
        emb = self.time(sinusoidal_embedding(t * 1000.0, 64).to(x.dtype))
        if self.label is not None and cond is not None:
            emb = emb + self.label(cond)
        for blk in self.blocks:
            s1, g1, s2, g2 = blk["ada"](F.silu(emb))[:, None].chunk(4, dim=-1)
            hid = hid + g1 * blk["attn"](blk["norm1"](hid) * (1 + s1))
            hid = hid + g2 * blk["mlp"](blk["norm2"](hid) * (1 + s2))
        out = self.out(hid).reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)


class SDPANet(nn.Module):
    """Attention straight through F.scaled_dot_product_attention: forward AD needs the MATH backend on CPU."""

    def __init__(self, dim=8):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x, t, cond=None):
        q, k, v = self.qkv(x[:, None, :, :] * (1 + t[:, None, None, None])).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v)[:, 0]


class OwnAttnProcessor:
    """A processor fewstep's kernel does not know (it attends through SDPA, so func can differentiate it)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        b, n, _ = hidden_states.shape
        q, k, v = (f(hidden_states).view(b, n, attn.heads, -1).transpose(1, 2)
                   for f in (attn.to_q, attn.to_k, attn.to_v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[0](out)


class OwnProcessorNet(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.attn = Attention(dim, heads=2, dim_head=dim // 2, processor=OwnAttnProcessor())

    def forward(self, x, t, cond=None):
        return self.attn(x * (1 + t[:, None, None]))


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class NoForwardADNet(nn.Module):
    """A custom op without a jvp rule: no forward-mode AD at all."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, t, cond=None):
        return self.drop(_NoForwardAD.apply(self.lin(x) * t[:, None, None]))


def _models():
    torch.manual_seed(0)
    unet = UNetNet(in_channels=1, base=8, mults=(1, 2), num_res=1, heads=2, num_classes=10)
    dit = TinyDiT(num_classes=10)
    mlp = MLPNet(dim=2, width=32, depth=2)
    return {"builtin-unet": (unet, (1, 8, 8), True), "tiny-dit": (dit, (1, 8, 8), True), "mlp": (mlp, (2,), False)}


def _trigflow_problem(net, shape, conditional, n=3, seed=0):
    den = Denoiser(net.double(), RectifiedFlow(), "flow", cond_kind="class" if conditional else "none",
                   num_classes=10 if conditional else None, data_shape=shape)
    wrapper = TrigFlowDenoiser(den, 0.5)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, dtype=F64, generator=g)
    dx = torch.randn(n, *shape, dtype=F64, generator=g)
    t = torch.tensor([0.2, 0.8, 1.4][:n], dtype=F64)
    cond = torch.tensor([1, 4, 7][:n]) if conditional else None
    return den, (lambda a, b: wrapper(a, b, cond)), (x, t), (dx, torch.ones_like(t))


@pytest.mark.parametrize("name", ["builtin-unet", "tiny-dit", "mlp"])
def test_backends_agree_in_fp64(name):
    net, shape, conditional = _models()[name]
    den, fn, primals, tangents = _trigflow_problem(net, shape, conditional)
    kernel = jvp(fn, primals, tangents, backend="kernel", modules=[den])
    func = jvp(fn, primals, tangents, backend="func", modules=[den])
    fd = jvp(fn, primals, tangents, backend="fd", modules=[den])
    scale = func.abs().max()
    assert scale > 1e-3  # a real derivative, not zeros
    torch.testing.assert_close(kernel, func, rtol=1e-10, atol=1e-10 * scale)
    # central differences at h = 1e-6 in fp64: O(h^2) truncation (large third t-derivatives from 1000-scaled
    # time embeddings) plus O(eps / h) round-off
    torch.testing.assert_close(fd, func, rtol=1e-5, atol=1e-5 * scale)
    # and the pieces add up: d/de F(x + e dx, t + e) = J_x dx + dF/dt
    x_only = jvp(fn, primals, (tangents[0], torch.zeros_like(primals[1])), backend="func", modules=[den])
    t_only = jvp(fn, primals, (torch.zeros_like(primals[0]), tangents[1]), backend="func", modules=[den])
    torch.testing.assert_close(x_only + t_only, func, rtol=1e-10, atol=1e-10 * scale)


def test_kernel_backend_routes_diffusers_attention_and_restores_it():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from fewstep_kernels import FewstepJVPAttnProcessor, count_backends

    torch.manual_seed(0)
    dit = TinyDiT().double()
    dit.blocks[1]["attn"].set_processor(AttnProcessor())  # the classic (baddbmm) processor
    sdpa = F.scaled_dot_product_attention
    seen = []
    for blk in dit.blocks:
        blk["attn"].register_forward_hook(lambda m, args, out: seen.append(type(m.processor)))
    x, t = torch.randn(2, 1, 8, 8, dtype=F64), torch.tensor([0.2, 0.9], dtype=F64)
    tangents = (torch.randn_like(x), torch.ones_like(t))
    with count_backends() as counts:
        jvp(lambda a, b: dit(a, b), (x, t), tangents, backend="kernel", modules=[dit])
    # SDPA processors keep their processor (their SDPA call is routed); the classic one is swapped meanwhile
    assert seen == [AttnProcessor2_0, FewstepJVPAttnProcessor]
    assert counts == {"reference": 2}  # both layers attended through fewstep's attention (CPU: its reference)
    assert F.scaled_dot_product_attention is sdpa
    seen.clear()
    with count_backends() as counts:
        jvp(lambda a, b: dit(a, b), (x, t), tangents, backend="func", modules=[dit])
    assert seen == [AttnProcessor2_0, AttnProcessor] and counts == {}
    assert [type(blk["attn"].processor) for blk in dit.blocks] == [AttnProcessor2_0, AttnProcessor]


def test_diffusers_unet2d_needs_the_group_norm_fix_and_backends_agree():
    """diffusers' UNet2DModel: plain torch.func.jvp fails (flash SDPA on CPU, then GroupNorm on a non-contiguous
    view); func and kernel work and agree with fd. Its timestep embedding runs in fp32 inside diffusers, so the
    check is along the image tangent, in fp64."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 attention_head_dim=8).double().eval()
    g = torch.Generator().manual_seed(0)
    x, dx = torch.randn(2, 1, 8, 8, dtype=F64, generator=g), torch.randn(2, 1, 8, 8, dtype=F64, generator=g)
    t = torch.tensor([300.0, 700.0], dtype=F64)

    def fn(a):
        return unet(a, t).sample

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), pytest.raises(RuntimeError, match="view size"):
        torch.func.jvp(fn, (x,), (dx,))
    func = jvp(fn, (x,), (dx,), backend="func", modules=[unet])
    kernel = jvp(fn, (x,), (dx,), backend="kernel", modules=[unet])
    fd = jvp(fn, (x,), (dx,), backend="fd", modules=[unet])
    torch.testing.assert_close(kernel, func, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fd, func, rtol=1e-7, atol=1e-8)
    # the hooks and the original processors are gone again
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(m.processor, AttnProcessor2_0) for m in unet.modules() if hasattr(m, "set_processor"))
    assert all(not m._forward_pre_hooks for m in unet.modules() if isinstance(m, nn.GroupNorm))


def test_auto_picks_kernel_where_it_runs_then_func_then_fd():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, dtype=F64)
    t = torch.tensor([0.3, 0.6], dtype=F64)
    tangents = (torch.randn_like(x), torch.ones_like(t))

    mlp = MLPNet(dim=2, width=16, depth=1).double()
    auto = JVP("auto")
    auto(lambda a, b: mlp(a, b), (torch.randn(3, 2, dtype=F64), t.new_tensor([0.1, 0.2, 0.3])),
         (torch.randn(3, 2, dtype=F64), torch.ones(3, dtype=F64)), modules=[mlp])
    assert auto.chosen == "kernel"

    sdpa = SDPANet().double()
    auto = JVP("auto")
    out = auto(lambda a, b: sdpa(a, b), (x, t), tangents, modules=[sdpa])
    assert auto.chosen == "kernel" and auto.attention == {"reference": 1}  # a bare SDPA call is routed too
    ref = jvp(lambda a, b: sdpa(a, b), (x, t), tangents, backend="fd")
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-8)

    # an attention layer with a processor the kernel does not know: kernel refuses, func runs
    own = OwnProcessorNet().double()
    auto = JVP("auto")
    out = auto(lambda a, b: own(a, b), (x, t), tangents, modules=[own])
    assert auto.chosen == "func" and auto.attention == {}
    ref = jvp(lambda a, b: own(a, b), (x, t), tangents, backend="fd")
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-8)

    net = NoForwardADNet().double().eval()
    auto = JVP("auto")
    with pytest.warns(RuntimeWarning, match="finite differences"):
        out = auto(lambda a, b: net(a, b), (x, t), tangents, modules=[net])
    assert auto.chosen == "fd"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once chosen, no more warnings
        again = auto(lambda a, b: net(a, b), (x, t), tangents, modules=[net])
    torch.testing.assert_close(out, again)
    # the op is linear in its input: 2 d/de [lin(x + e dx) t(e)] exactly
    lin = net.lin
    exact = 2 * ((tangents[0] @ lin.weight.T) * t[:, None, None] + lin(x) * tangents[1][:, None, None])
    torch.testing.assert_close(out, exact, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="unknown JVP backend"):
        JVP("nope")


def test_finite_differences_use_the_same_dropout_on_both_sides_and_leave_the_rng_alone():
    torch.manual_seed(0)
    net = NoForwardADNet().double().train()  # dropout active
    x = torch.randn(4, 4, 8, dtype=F64)
    t = torch.full((4,), 0.5, dtype=F64)
    dx = torch.randn_like(x)
    state = torch.get_rng_state()
    fd = jvp(lambda a, b: net(a, b), (x, t), (dx, torch.zeros_like(t)), backend="fd", fd_steps=(1e-3, 1e-3))
    assert torch.equal(torch.get_rng_state(), state)
    # with one dropout mask m on both sides the difference is m * (linear part): zero exactly where dropped
    torch.manual_seed(123)
    masked = torch.get_rng_state()
    torch.set_rng_state(state)
    out = net(x, t)
    torch.set_rng_state(masked)
    dropped = out == 0
    assert dropped.any() and bool((fd[dropped] == 0).all())
    exact = 2 * (dx @ net.lin.weight.T) * 0.5 * 2.0  # x2 op, t = 0.5, dropout rescale 1/(1 - 0.5)
    torch.testing.assert_close(fd[~dropped], exact[~dropped], rtol=1e-8, atol=1e-8)


def test_jvp_runs_outside_autocast():
    """Under bf16 autocast (the trainer's --mixed-precision bf16), forward AD through conv -> GroupNorm -> conv
    would fail on mis-cast tangents; every backend runs in the parameters' precision instead."""
    torch.manual_seed(0)
    net = UNetNet(in_channels=1, base=8, mults=(1, 2), num_res=1, heads=2)
    den = Denoiser(net, RectifiedFlow(), "flow", data_shape=(1, 8, 8))
    wrapper = TrigFlowDenoiser(den, 0.5)
    x, dx = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t = torch.tensor([0.4, 1.1], dtype=F64)
    for backend in ("kernel", "func", "fd"):
        ref = jvp(lambda a, b: wrapper(a, b), (x, t), (dx, torch.ones_like(t)), backend=backend, modules=[den])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = jvp(lambda a, b: wrapper(a, b), (x, t), (dx, torch.ones_like(t)), backend=backend, modules=[den])
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_finite_difference_is_second_order_and_one_sided_steps_work():
    f = lambda a, b: torch.sin(3 * a) * torch.exp(b)[:, None]  # noqa: E731
    x = torch.tensor([[0.3, -0.2]], dtype=F64)
    t = torch.tensor([0.4], dtype=F64)
    v = (torch.ones_like(x), torch.ones_like(t))
    exact = (3 * torch.cos(3 * x) + torch.sin(3 * x)) * math.exp(0.4)
    errs = [float((jvp(f, (x, t), v, backend="fd", fd_steps=(h, h)) - exact).abs().max()) for h in (1e-2, 5e-3)]
    assert 3.5 < errs[0] / errs[1] < 4.5  # halving h quarters the error
    one_sided = jvp(f, (x, t), v, backend="fd", fd_steps=(torch.tensor([1e-6]), torch.tensor([0.0])))
    torch.testing.assert_close(one_sided, exact, rtol=1e-5, atol=1e-5)
