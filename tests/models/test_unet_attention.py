"""UNet self-attention through fewstep_kernels: same numbers as scaled_dot_product_attention (the
shipped teachers are unchanged), and forward-mode AD on CPU without the SDPA MATH-backend workaround."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from fewstep.models import unet as unet_module
from fewstep.models.unet import SelfAttention, UNetNet

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def sdpa_self_attention(self, x):
    """The UNet's attention block as it was before the kernels: F.scaled_dot_product_attention."""
    b, c, h, w = x.shape
    q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
    o = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    return x + self.proj(o.transpose(-1, -2).reshape(b, c, h, w))


def test_self_attention_calls_the_dispatcher(monkeypatch):
    calls = []
    original = unet_module.attention

    def spy(q, k, v, *a, **kw):
        calls.append(q.shape)
        return original(q, k, v, *a, **kw)

    monkeypatch.setattr(unet_module, "attention", spy)
    block = SelfAttention(16, heads=2)
    block(torch.randn(3, 16, 4, 4))
    assert calls == [torch.Size([3, 2, 16, 8])]


def test_digits_teacher_outputs_unchanged(monkeypatch):
    from fewstep.teachers import load_teacher

    den = load_teacher("digits")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, *den.data_shape, generator=g)
    t = torch.rand(16, generator=g)
    labels = torch.arange(16) % 11  # 10 = the null label
    with torch.no_grad():
        now = den(x, t, labels)
        monkeypatch.setattr(SelfAttention, "forward", sdpa_self_attention)
        before = den(x, t, labels)
    torch.testing.assert_close(now, before, rtol=1e-5, atol=1e-5)


def test_unet_jvp_without_math_backend_matches_finite_differences():
    torch.manual_seed(0)
    net = UNetNet(in_channels=1, base=8, mults=(1, 2), heads=2, num_classes=10).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.rand(2, dtype=torch.float64)
    dx = torch.randn_like(x)
    labels = torch.tensor([3, 10])

    def f(a):
        return net(a, t, labels)

    out, tangent = torch.func.jvp(f, (x,), (dx,))
    torch.testing.assert_close(out, f(x))
    h = 1e-6
    fd = (f(x + h * dx) - f(x - h * dx)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)
    with forward_ad.dual_level():
        dual_tangent = forward_ad.unpack_dual(f(forward_ad.make_dual(x, dx))).tangent
    torch.testing.assert_close(dual_tangent, tangent)
