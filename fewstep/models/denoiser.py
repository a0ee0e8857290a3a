"""The Denoiser: one canonical interface over every teacher and student.

A Denoiser wraps a network with its noise process, its prediction type and its conditioning.
Samplers and methods only call ``denoiser(x_t, t, cond, guidance) -> x0`` (k-diffusion's
convention, Karras et al. 2022) plus the process that maps t to (alpha_t, sigma_t); conversions
to eps, v, flow velocity or TrigFlow F live in ``fewstep.diffusion.predictions``.

Classifier-free guidance (Ho & Salimans 2022) is built in: x0 = x0_u + w (x0_c - x0_u), which is
the same as guiding eps, v or velocity since all are affine in x0 at a fixed state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fewstep.diffusion.predictions import check_prediction, convert_prediction, to_x0
from fewstep.diffusion.processes import NoiseProcess, as_time, expand_like

Cond = Any  # None, a LongTensor of class labels, a Tensor of embeddings, or a dict of tensors

COND_KINDS = ("none", "class", "text")


def cond_batch_size(cond: Cond) -> int | None:
    if cond is None:
        return None
    if isinstance(cond, dict):
        return next(iter(cond.values())).shape[0]
    return cond.shape[0]


def cat_conds(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditions along the batch (tensors or dicts of tensors)."""
    if a is None:
        return None
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def select_conds(cond: Cond, index: torch.Tensor) -> Cond:
    """The rows `index` of a condition (tensors or dicts of tensors; None stays None)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[index.to(v.device)] for k, v in cond.items()}
    return cond[index.to(cond.device)]


class Denoiser(nn.Module):
    """network + process + prediction type + conditioning, called as D(x_t, t, cond, guidance) -> x0.

    The network is called as ``net(x_t, t, cond)`` with x_t and t in the process' native units.
    For class conditioning, label ``num_classes`` is the null (unconditional) label. For text
    conditioning, ``null_cond`` holds the embeddings of the empty prompt (batch 1), broadcast.
    """

    def __init__(
        self,
        net: nn.Module,
        process: NoiseProcess,
        prediction: str,
        *,
        cond_kind: str = "none",
        num_classes: int | None = None,
        null_cond: Cond = None,
        sigma_d: float = 1.0,
        data_shape: tuple[int, ...] | None = None,
        meta: dict | None = None,
        boundary: dict | None = None,
    ):
        super().__init__()
        if cond_kind not in COND_KINDS:
            raise ValueError(f"cond_kind must be one of {COND_KINDS}, got {cond_kind!r}")
        self.net = net
        self.process = process
        self.prediction = check_prediction(prediction)
        self.cond_kind = cond_kind
        self.num_classes = num_classes
        self._null_cond = null_cond
        self.sigma_d = sigma_d
        self.data_shape = tuple(data_shape) if data_shape is not None else None
        # Consistency-model boundary parametrisation (see `boundary_scalings`), or None.
        self.boundary = check_boundary(boundary)
        # Free-form description saved with the weights: data name, default metric, recommended
        # sampler settings, training command and metrics.
        self.meta = dict(meta or {})
        # What a latent text-to-image model needs around its network (prompt encoder, VAE): a
        # `fewstep.models.diffusers_pipeline.TextToImageParts`, shared by copies; None otherwise.
        self.components = None

    def _apply(self, fn, recurse=True):
        """`.to(device, dtype)`, `.cuda()`, `.half()`, ...: the text null condition follows the network (so CFG does
        not copy it to the accelerator at every call)."""
        super()._apply(fn, recurse)
        null = self._null_cond
        if isinstance(null, dict):
            self._null_cond = {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in null.items()}
        elif isinstance(null, torch.Tensor):
            self._null_cond = fn(null)
        return self

    # -- conditioning --------------------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        return self.cond_kind != "none"

    def null_condition(self, batch: int, device=None) -> Cond:
        """The unconditional input for a batch (null label or empty-prompt embeddings)."""
        if self.cond_kind == "none":
            return None
        if self.cond_kind == "class":
            return torch.full((batch,), int(self.num_classes), dtype=torch.long, device=device)
        null = self._null_cond
        if isinstance(null, dict):
            return {k: v.expand(batch, *v.shape[1:]).to(device) for k, v in null.items()}
        return null.expand(batch, *null.shape[1:]).to(device)

    @property
    def guidance_embedded(self) -> bool:
        """True when the network takes the guidance scale as an input (LCM-style students) instead of CFG."""
        cfg = self.net.config() if hasattr(self.net, "config") else {}
        return bool(cfg.get("guidance_embed", False))

    @property
    def steps_embedded(self) -> bool:
        """True when the network takes the sampling step count as an input (TDM's sampling-steps-aware students)."""
        cfg = self.net.config() if hasattr(self.net, "config") else {}
        return bool(cfg.get("steps_embed", False))

    # -- evaluation ----------------------------------------------------------------------------
    def raw(self, x_t: torch.Tensor, t, cond: Cond = None, guidance=None, steps=None) -> torch.Tensor:
        """The network's native prediction (no CFG; `guidance` only reaches guidance-embedded networks and
        `steps`, the sampling step count (an int or a (B,) tensor), only step-count-embedded ones)."""
        t = as_time(t, x_t)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if self.conditional and cond is None:
            cond = self.null_condition(x_t.shape[0], x_t.device)
        # time stays at least fp32 (bf16 would round t * 1000 to a few units before the embedding)
        t = t.to(torch.promote_types(x_t.dtype, torch.float32))
        extra = {}
        if steps is not None and self.steps_embedded:
            extra["steps"] = torch.as_tensor(steps, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        if self.guidance_embedded:
            w = torch.ones(()) if guidance is None else torch.as_tensor(guidance, dtype=torch.float32)
            return self.net(x_t, t, cond, guidance=w.to(x_t.device).expand(x_t.shape[0]), **extra)
        return self.net(x_t, t, cond, **extra)

    def forward(self, x_t: torch.Tensor, t, cond: Cond = None, guidance=1.0, kind: str = "x0",
                steps=None) -> torch.Tensor:
        """Guided x0 estimate (or prediction `kind`). `guidance` is a float or a (B,) tensor (1 = no guidance);
        `steps` the sampling step count for step-count-embedded networks (ignored by others).

        Methods call trained networks through here (not `predict`) so that DDP/FSDP wrappers see the call.
        """
        return self.predict(x_t, t, cond, guidance, kind=kind, steps=steps)

    def predict(self, x_t: torch.Tensor, t, cond: Cond = None, guidance=1.0, kind: str = "x0", steps=None):
        """Guided prediction of any type (x0, eps, v, flow, trigflow) in this process."""
        t = as_time(t, x_t)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        unguided = (
            not self.conditional
            or cond is None
            or (not isinstance(guidance, torch.Tensor) and float(guidance) == 1.0)
        )
        if self.guidance_embedded:
            out = self.raw(x_t, t, cond, guidance, steps=steps)
        elif unguided:
            out = self.raw(x_t, t, cond, steps=steps)
        else:
            b = x_t.shape[0]
            null = self.null_condition(b, x_t.device)
            if steps is not None and torch.as_tensor(steps).ndim > 0:  # (B,) or (1,): one per sample, both halves
                steps = torch.as_tensor(steps).expand(b)
                steps = torch.cat([steps, steps])
            both = self.raw(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conds(cond, null), steps=steps)
            c, u = both[:b], both[b:]
            w = guidance if isinstance(guidance, torch.Tensor) else torch.tensor(float(guidance))
            out = u + expand_like(w, c) * (c - u)
        if self.boundary is not None:
            c_skip, c_out = boundary_scalings(self.process, t, self.boundary)
            x0 = to_x0(out, x_t, t, self.process, self.prediction, self.sigma_d)
            x0 = expand_like(c_skip, x0).to(x0.dtype) * x_t + expand_like(c_out, x0).to(x0.dtype) * x0
            return convert_prediction(x0, x_t, t, self.process, "x0", kind, self.sigma_d)
        if kind == "x0" and self.prediction != "x0":
            return to_x0(out, x_t, t, self.process, self.prediction, self.sigma_d)
        return convert_prediction(out, x_t, t, self.process, self.prediction, kind, self.sigma_d)

    def config(self) -> dict:
        return {
            "process": self.process.config(),
            "prediction": self.prediction,
            "cond_kind": self.cond_kind,
            "num_classes": self.num_classes,
            "sigma_d": self.sigma_d,
            "data_shape": list(self.data_shape) if self.data_shape else None,
            **({"boundary": dict(self.boundary)} if self.boundary is not None else {}),
        }


BOUNDARY_TYPES = ("lcm",)


def check_boundary(boundary: dict | None) -> dict | None:
    if boundary is None:
        return None
    kind = boundary.get("type")
    if kind not in BOUNDARY_TYPES:
        raise ValueError(f"unknown boundary type {kind!r}; allowed: {', '.join(BOUNDARY_TYPES)}")
    return {"type": kind, "sigma_data": float(boundary.get("sigma_data", 0.5)),
            "time_scale": float(boundary.get("time_scale", 10.0))}


def boundary_scalings(process: NoiseProcess, t: torch.Tensor, boundary: dict):
    """LCM's boundary functions (Luo et al. 2023; Song et al. 2023): f = c_skip x_t + c_out x0_net with
    c_skip = sd^2 / (u^2 + sd^2), c_out = u / sqrt(u^2 + sd^2), u = time_scale * 1000 * s(t), where s is
    the flow time with t's SNR (s = 0 at clean data, so c_skip = 1 and c_out = 0 there; for a 1000-step
    VP schedule u is about LCM's time_scale * timestep). Computed in float64, returned as (B,) tensors.
    """
    r = process.ratio(t.to(torch.float64))
    s = torch.where(torch.isinf(r), torch.ones_like(r), r / (1.0 + r))
    u = boundary["time_scale"] * 1000.0 * s
    sd2 = boundary["sigma_data"] ** 2
    return sd2 / (u * u + sd2), u / torch.sqrt(u * u + sd2)
