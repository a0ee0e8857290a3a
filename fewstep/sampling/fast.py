"""Fast few-step inference: what `fewstep sample --compile --cuda-graphs --channels-last --vae-tiling` turns on.

Each option is opt-in because it changes numerics slightly (another kernel choice, another memory layout) or
costs start-up time (compilation, graph capture):

- ``channels_last``: the network's and the VAE's convolution weights in NHWC (`torch.channels_last`), which
  cuDNN's fastest convolutions use; networks without 2-D convolutions are left as they are.
- ``compile``: `torch.compile` of the denoising network (the diffusers UNet/transformer, or the built-in net) and
  of the VAE decoder, with static shapes.
- ``cuda_graphs``: the network's (and the VAE decoder's) calls replayed from CUDA graphs, one graph per input
  signature (shapes, dtypes, device and the non-tensor arguments), captured on its second call: a few-step student
  at a fixed batch size and resolution launches each step as one graph instead of hundreds of kernels. Calls with
  gradients (training, JVPs) run eagerly, and so does a signature whose capture fails (with a warning). CUDA only.
- ``vae_tiling``: diffusers' tiled VAE decode, for images too large to decode at once.

On CUDA, any of compile, CUDA graphs or channels_last also turns on cuDNN's autotuner
(`torch.backends.cudnn.benchmark`, process-wide): fixed-shape few-step sampling then runs the fastest convolution
algorithm for its shapes, chosen on the first call.

`prepare_inference(denoiser, ...)` applies them in place (idempotent) and returns what it applied.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from fewstep.errors import FewstepError

MAX_GRAPHS = 8  # input signatures captured per network; calls with further ones run eagerly


def _has_conv2d(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def network_module(denoiser) -> nn.Module:
    """The module that does the denoiser's work: a diffusers net's UNet/transformer, else the built-in net."""
    net = _unwrapped(denoiser.net)
    return net.live if hasattr(net, "live") else net


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.inner if isinstance(module, GraphedNet) else module


def graphed_modules(denoiser) -> list:
    """The GraphedNets a denoiser runs (its network's, its VAE decoder's)."""
    vae = _vae(denoiser)
    return [m for m in (denoiser.net, getattr(vae, "decoder", None)) if isinstance(m, GraphedNet)]


def _vae(denoiser):
    parts = getattr(denoiser, "components", None)
    return getattr(parts, "vae", None) if parts is not None else None


def prepare_inference(denoiser, *, compile: bool = False, cuda_graphs: bool = False, channels_last: bool = False,
                      vae_tiling: bool = False) -> dict:
    """Turn on the fast-inference options (module docstring) for `denoiser` in place; returns a JSON-able record of
    what is on. Options already applied stay applied; an option asked for where it cannot apply is a one-line error
    (CUDA graphs off CUDA)."""
    from fewstep.sampling.generation import model_device

    state = denoiser.__dict__.setdefault("_fast_inference", {})
    device = model_device(denoiser)
    if cuda_graphs and device.type != "cuda":
        raise FewstepError(f"--cuda-graphs needs the model on a CUDA device; it is on {device} (use --device cuda)")
    vae = _vae(denoiser)
    net = network_module(denoiser)
    graphed = graphed_modules(denoiser)
    if (channels_last and not state.get("channels_last")) or (compile and not state.get("compile")):
        for g in graphed:
            g.reset()  # graphs captured over the old weights' memory or kernels are dropped
    if channels_last and not state.get("channels_last"):
        applied = []
        if _has_conv2d(net):
            net.to(memory_format=torch.channels_last)
            applied.append("network")
        if vae is not None:
            vae.to(memory_format=torch.channels_last)
            applied.append("vae")
        state["channels_last"] = applied
    if compile and not state.get("compile"):
        net.compile(dynamic=False)
        applied = ["network"]
        if vae is not None:
            _unwrapped(vae.decoder).compile(dynamic=False)
            applied.append("vae decoder")
        state["compile"] = applied
    if cuda_graphs and not state.get("cuda_graphs"):
        denoiser.net = GraphedNet(denoiser.net, cuda_capture)
        applied = ["network"]
        if vae is not None:
            vae.decoder = GraphedNet(vae.decoder, cuda_capture)
            applied.append("vae decoder")
        state["cuda_graphs"] = applied
    if device.type == "cuda" and (compile or cuda_graphs or channels_last):
        torch.backends.cudnn.benchmark = True
        state["cudnn_benchmark"] = True
    if vae_tiling and not state.get("vae_tiling"):
        if vae is None:
            raise FewstepError("--vae-tiling applies to latent text-to-image models (it tiles their VAE decode)")
        vae.enable_tiling()
        state["vae_tiling"] = True
    return {k: v for k, v in state.items() if v}


# -- CUDA graphs ---------------------------------------------------------------------------------------------
# capture(fn, device, pool) -> (replay, static outputs)
Capture = Callable[[Callable[[], object], torch.device, object], tuple[Callable[[], None], object]]


def cuda_capture(fn: Callable[[], object], device: torch.device, pool=None,
                 warmup: int = 1) -> tuple[Callable[[], None], object]:
    """Capture `fn()` (which reads only its static input tensors) in a CUDA graph on `device`: a warm-up call on a
    side stream (lazy state is built), then one captured call on a stream of that device, into the memory `pool`.
    Returns (replay, static outputs): replay() re-runs the graph, writing the same output tensors."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream(device)):
            out = fn()
    return graph.replay, out


def eager_capture(fn: Callable[[], object], device=None, pool=None) -> tuple[Callable[[], None], object]:
    """What `cuda_capture` promises, on any device, by re-running `fn()` and copying into the first call's
    outputs: the reference GraphedNet is tested against on the CPU."""
    out = fn()

    def replay():
        new = fn()
        tree_map(lambda dst, src: dst.copy_(src) if isinstance(dst, torch.Tensor) else None, out, new)

    return replay, out


class GraphedNet(nn.Module):
    """A network whose gradient-free calls replay captured graphs. The first call with a new input signature (shapes,
    dtypes, device, non-tensor arguments) runs eagerly (a warm-up; a signature met once, such as a last partial
    batch, is never captured); the second records the network over static input buffers with `capture`; every later
    call copies its inputs into those buffers, replays, and returns clones of the static outputs. The graphs of one
    network share a memory pool (their replays never overlap and their outputs are cloned at once). Attributes not
    found here, and the state dict, are the wrapped network's. `reset()` drops every graph (after the weights moved,
    were cast or re-laid out: a graph reads the memory it was captured with)."""

    def __init__(self, inner: nn.Module, capture: Capture = cuda_capture, max_graphs: int = MAX_GRAPHS):
        super().__init__()
        self.inner = inner
        self._capture_fn = capture
        self._max_graphs = int(max_graphs)
        self._graphs: dict = {}
        self._seen: set = set()
        self._pool = None
        self.replays = 0
        self.eager_calls = 0
        self.failures: list[str] = []  # why a signature could not be captured (it then runs eagerly)
        self._register_load_state_dict_pre_hook(self._inner_keys, with_module=False)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def config(self) -> dict:
        return self.inner.config()

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The wrapped network's state dict, under this module's own prefix (no "inner.")."""
        return self.inner.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    @staticmethod
    def _inner_keys(state_dict, prefix, *args):
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "inner.")]:
            state_dict[prefix + "inner." + key[len(prefix):]] = state_dict.pop(key)

    def reset(self) -> None:
        self._graphs.clear()
        self._seen.clear()
        self._pool = None

    def _apply(self, fn, recurse=True):
        self.reset()
        return super()._apply(fn, recurse)

    @staticmethod
    def _signature(flat) -> tuple:
        return tuple(("tensor", tuple(a.shape), a.dtype, str(a.device)) if isinstance(a, torch.Tensor)
                     else ("value", repr(a)) for a in flat)

    @staticmethod
    def _differentiating() -> bool:
        """Gradients, forward-mode dual tensors or a torch.func transform: a graph would drop them."""
        from torch.autograd import forward_ad

        return (torch.is_grad_enabled() or forward_ad._current_level >= 0
                or torch._C._functorch.peek_interpreter_stack() is not None)

    def _eager(self, args, kwargs):
        self.eager_calls += 1
        return self.inner(*args, **kwargs)

    def forward(self, *args, **kwargs):
        if self._differentiating():
            return self._eager(args, kwargs)
        flat, spec = tree_flatten((args, kwargs))
        key = (self._signature(flat), str(spec))
        if key not in self._graphs:
            if key not in self._seen or len(self._graphs) >= self._max_graphs:
                self._seen.add(key)
                return self._eager(args, kwargs)
            try:
                self._graphs[key] = self._record(flat, spec)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - a network that cannot be captured runs eagerly, and says why
                self._graphs[key] = None
                reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
                self.failures.append(reason)
                warnings.warn(f"CUDA graph capture failed, these calls run eagerly: {reason}", stacklevel=2)
        entry = self._graphs[key]
        if entry is None:  # this signature cannot be captured
            return self._eager(args, kwargs)
        static, replay, out = entry
        for buf, a in zip(static, flat, strict=True):
            if isinstance(buf, torch.Tensor):
                buf.copy_(a)
        replay()
        self.replays += 1
        return tree_map(lambda o: o.clone() if isinstance(o, torch.Tensor) else o, out)

    def _record(self, flat, spec):
        from fewstep.sampling.generation import model_device

        device = model_device(self.inner)
        if self._pool is None and device.type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()
        # inputs become buffers on the network's device (a CPU time tensor would be an upload inside the graph)
        static = [a.detach().to(device).clone() if isinstance(a, torch.Tensor) else a for a in flat]
        args, kwargs = tree_unflatten(static, spec)
        replay, out = self._capture_fn(lambda: self.inner(*args, **kwargs), device, self._pool)
        return static, replay, out


__all__ = ["GraphedNet", "cuda_capture", "eager_capture", "graphed_modules", "network_module", "prepare_inference"]
