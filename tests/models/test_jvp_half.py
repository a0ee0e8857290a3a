"""Exact JVPs in half precision through diffusers teachers (tiny random pipelines, CPU).

- A norm layer whose forward AD returns a float32 tangent for a bf16 output (what torch's layer norm does on
  CUDA) no longer breaks the next Linear: the tangent is cast back to the primal's dtype.
- SD3's joint attention runs through fewstep's attention (the kernel path) and matches torch.func in fp32.
- In bf16 (the networks cast for the pass), kernel and func tangents are within 2e-2 (relative L2) of an fp32
  func reference; central differences in bf16 are far off.
- A backend asked for by name fails with one line instead of falling back.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

import fewstep.models.jvp as jvp_module
from fewstep.errors import FewstepError
from fewstep.models.jvp import JVP, jvp, networks_in_dtype
from fewstep.models.trigflow import TrigFlowDenoiser
from fewstep.teachers import load_teacher
from fewstep.teachers.random_pipelines import RANDOM_ARCHS, save_random_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = [a for a in ("sdxl", "sd3", "flux") if a in RANDOM_ARCHS]
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("half")
    return {arch: load_teacher(save_random_pipeline(arch, root / arch)).eval() for arch in ARCHS}


def _problem(den, seed=0):
    """sCM's JVP problem on a teacher: fn(x, t) = F(x, t) in TrigFlow, tangents (dx, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *den.data_shape, generator=g)
    dx = torch.randn(2, *den.data_shape, generator=g)
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    cond = den.components.encode_prompts(["a cat", "the red thing"])
    wrapper = TrigFlowDenoiser(den, 0.5, through_forward=False)
    return (lambda a, b: wrapper(a, b, cond)), (x, t), (dx, torch.ones_like(t))


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


_LAYER_NORM = F.layer_norm


class CudaLikeLayerNorm(torch.autograd.Function):
    """F.layer_norm as torch computes it on CUDA for half inputs: float32 statistics, a half output, and a
    forward-AD tangent left in float32 (the tangent is combined with the float32 rstd)."""

    @staticmethod
    def forward(x, shape, weight, bias, eps):
        w = None if weight is None else weight.float()
        b = None if bias is None else bias.float()
        return _LAYER_NORM(x.float(), shape, w, b, eps).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, shape, weight, _bias, eps = inputs
        ctx.save_for_forward(x, weight)
        ctx.shape, ctx.eps = shape, eps

    @staticmethod
    def jvp(ctx, tx, *_):
        x, weight = ctx.saved_tensors
        dims = tuple(range(-len(ctx.shape), 0))
        xf = x.float()
        mean = xf.mean(dims, keepdim=True)
        rstd = torch.rsqrt(xf.var(dims, unbiased=False, keepdim=True) + ctx.eps)
        xhat = (xf - mean) * rstd
        t = tx * rstd  # float32 from here on
        t = t - t.mean(dims, keepdim=True) - xhat * (xhat * t).mean(dims, keepdim=True)
        return t if weight is None else t * weight


def cuda_like_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return CudaLikeLayerNorm.apply(x, tuple(normalized_shape), weight, bias, eps)


@pytest.mark.parametrize("backend", ["kernel", "func"])
def test_a_float32_tangent_from_a_norm_layer_is_cast_back(teachers, backend, monkeypatch):
    den = teachers["sdxl"]
    fn, primals, tangents = _problem(den)
    ref = jvp(fn, primals, tangents, backend="func", modules=[den])
    monkeypatch.setattr(F, "layer_norm", cuda_like_layer_norm)
    with monkeypatch.context() as m:  # without the cast: the CUDA failure ("same dtype" in the next Linear)
        m.setattr(jvp_module, "tangents_in_primal_dtype", lambda modules: contextlib.nullcontext())
        with pytest.raises(RuntimeError, match="dtype"):
            jvp(fn, primals, tangents, backend=backend, modules=[den], dtype=BF16)
    out = jvp(fn, primals, tangents, backend=backend, modules=[den], dtype=BF16)
    assert out.dtype == BF16
    assert _rel(out, ref) < 2e-2
    # the hooks are gone again
    assert not any(m._forward_hooks for m in den.modules() if isinstance(m, nn.LayerNorm))


def test_a_lora_students_tree_is_reached_cast_and_hooked(tmp_path, monkeypatch):
    """A LoRA student runs a diffusers tree it does not register (it shares the teacher's tensors): the JVP still
    casts it, hooks its norm layers and routes its attention. Set up as a mixed-precision run does: the frozen
    base in bf16, the adapters in fp32, torch's CUDA layer-norm rule."""
    from fewstep.methods.base import DistillMethod
    from fewstep.models.jvp import network_dtype
    from fewstep_kernels import count_backends

    den = load_teacher(save_random_pipeline("sdxl", tmp_path / "sdxl")).eval()
    method = DistillMethod(den)
    method.student_options = {"lora_rank": 4}
    student = method.student_from_teacher().eval()
    fn, primals, tangents = _problem(student)
    ref = jvp(fn, primals, tangents, backend="func", modules=[student])  # the adapters start at zero: the teacher's
    adapters = {id(p) for p in student.parameters()}
    for p in den.parameters():  # what the trainer does to frozen weights under --mixed-precision bf16
        if id(p) not in adapters:
            p.data = p.data.to(BF16)
    assert network_dtype([student]) == torch.float32  # only the adapters are registered ...
    assert network_dtype(jvp_module.expand_modules([student])) == BF16  # ... the tree it runs is bf16
    monkeypatch.setattr(F, "layer_norm", cuda_like_layer_norm)
    layers = [m for m in student.net.live.modules() if hasattr(m, "set_processor")]
    runner = JVP("kernel")
    with count_backends() as counts:
        out = runner(fn, primals, tangents, modules=[student], dtype=BF16)
    assert counts == {"reference": len(layers)} and layers
    assert runner.dtype == BF16 and out.dtype == BF16
    assert _rel(out, ref) < 2e-2
    assert all(p.dtype == torch.float32 for p in student.parameters())  # the adapters are fp32 again


def test_kernel_attention_restores_everything_after_an_exception():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from fewstep_kernels import kernel_attention

    net = nn.ModuleDict({"a": Attention(8, heads=2, dim_head=4), "b": Attention(8, heads=2, dim_head=4,
                                                                                  processor=AttnProcessor())})
    net["a"].processor._attention_backend = "flash"  # a processor pinned to another diffusers backend
    sdpa = F.scaled_dot_product_attention
    with pytest.raises(KeyError), kernel_attention([net]):
        assert F.scaled_dot_product_attention is not sdpa and net["a"].processor._attention_backend is None
        raise KeyError("boom")
    assert F.scaled_dot_product_attention is sdpa
    assert type(net["a"].processor) is AttnProcessor2_0 and net["a"].processor._attention_backend == "flash"
    assert type(net["b"].processor) is AttnProcessor


@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_path_matches_func_in_fp32(teachers, arch):
    """Every attention layer (SD3's joint attention, Flux's rotary attention included) runs through fewstep's
    attention, and the tangent is torch.func's."""
    from fewstep_kernels import count_backends

    den = teachers[arch]
    fn, primals, tangents = _problem(den)
    layers = [m for m in den.modules() if hasattr(m, "set_processor") and getattr(m, "processor", None)]
    with count_backends() as counts:
        kernel = jvp(fn, primals, tangents, backend="kernel", modules=[den])
    assert counts == {"reference": len(layers)} and layers
    func = jvp(fn, primals, tangents, backend="func", modules=[den])
    assert float(func.abs().max()) > 1e-3
    assert _rel(kernel, func) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_tangents_are_within_2e_2_of_the_fp32_reference(teachers, arch):
    den = teachers[arch]
    fn, primals, tangents = _problem(den)
    ref = jvp(fn, primals, tangents, backend="func", modules=[den])
    errors = {}
    for backend in ("kernel", "func"):
        out = jvp(fn, primals, tangents, backend=backend, modules=[den], dtype=BF16)
        assert out.dtype == BF16
        errors[backend] = _rel(out, ref)
    assert max(errors.values()) < 2e-2, errors
    # the parameters are float32 again afterwards
    assert all(p.dtype == torch.float32 for p in den.parameters())
    # central differences in bf16 (the network cast to bf16) are mostly round-off
    with networks_in_dtype([den], BF16):
        fd = jvp(fn, (primals[0].to(BF16), primals[1]), (tangents[0].to(BF16), tangents[1]), backend="fd",
                 modules=[den])
    assert _rel(fd, ref) > 10 * max(errors.values())


def test_networks_in_dtype_casts_shared_tensors_once_and_restores_them():
    lin = nn.Linear(4, 4)
    tied = nn.Linear(4, 4)
    tied.weight = lin.weight
    net = nn.Sequential(lin, nn.BatchNorm1d(4), tied)
    before = {n: t for n, t in net.state_dict(keep_vars=True).items()}
    with networks_in_dtype([net, lin], BF16):
        assert net[0].weight.dtype == BF16 and net[0].weight is net[2].weight
        assert net[1].running_mean.dtype == BF16 and net[1].num_batches_tracked.dtype == torch.int64
        out = net.eval()(torch.randn(3, 4, dtype=BF16))
        assert out.dtype == BF16
    after = net.state_dict(keep_vars=True)
    assert all(after[n] is before[n] for n in before)
    assert isinstance(net[0].weight, nn.Parameter) and net[0].weight.dtype == torch.float32


class OwnAttnProcessor:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        b, n, _ = hidden_states.shape
        q, k, v = (f(hidden_states).view(b, n, attn.heads, -1).transpose(1, 2)
                   for f in (attn.to_q, attn.to_k, attn.to_v))
        return attn.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


def test_a_backend_asked_for_by_name_does_not_fall_back():
    torch.manual_seed(0)
    attn = Attention(8, heads=2, dim_head=4, processor=OwnAttnProcessor())
    x, t = torch.randn(2, 5, 8), torch.tensor([0.3, 0.6])

    def fn(a, b):
        return attn(a * (1 + b[:, None, None]))

    tangents = (torch.randn_like(x), torch.ones_like(t))
    kernel = JVP("kernel")
    with pytest.raises(FewstepError) as err:
        kernel(fn, (x, t), tangents, modules=[attn])
    text = str(err.value)
    assert "\n" not in text and "OwnAttnProcessor" in text and "jvp=kernel" in text
    assert kernel.chosen == "kernel"  # no fallback
    func = JVP("func")
    out = func(fn, (x, t), tangents, modules=[attn])
    ref = jvp(fn, (x, t), tangents, backend="fd")
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-3)
