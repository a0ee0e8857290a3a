"""Diffusers denoising networks as fewstep networks, and the students derived from them.

`DiffusersNet` calls a diffusers model as ``net(x_t, t, cond, guidance=None)`` with x_t in latent space, in
fewstep's (B, C, H, W) layout, and t in the process' native time (the VP timestep index for UNets; flow time in
[0, 1] for SD3, which takes 1000 t, and for Flux, which multiplies by 1000 itself), and ``cond`` a dict of text
conditions:

- ``sd`` (SD1.x/SD2.x ``UNet2DConditionModel``): ``prompt_embeds``;
- ``sdxl`` (a UNet with ``addition_embed_type="text_time"``): ``prompt_embeds``, ``text_embeds`` (pooled),
  ``time_ids`` (original size, crop corner, target size);
- ``sd3`` (``SD3Transformer2DModel``): ``prompt_embeds``, ``pooled_prompt_embeds``;
- ``flux`` (``FluxTransformer2DModel``): ``prompt_embeds`` (T5), ``pooled_prompt_embeds`` (CLIP). The net packs
  the latents into Flux's (B, H/2 * W/2, 4C) tokens of 2x2 patches (`pack_latents`, as ``FluxPipeline`` does),
  makes the position ids (``img_ids`` from the latent grid, ``txt_ids`` zeros), and unpacks the velocity.

Guidance-distilled Flux transformers (FLUX.1-dev: ``guidance_embeds=True``) take the guidance scale as an input:
their nets report ``guidance_embed`` so the Denoiser feeds them the scale w (``FluxPipeline``'s
``guidance_scale``, 3.5 by default there and for a net called with guidance None) and never runs a
classifier-free guidance pass. Their students keep that input (nothing is added, a LoRA file carries it).

Students and fake scores are derived from a teacher's net (`DiffusersNet.derive`):

- LoRA (Hu et al. 2022) through peft: `LoraDiffusersNet` builds its own module tree whose every base
  tensor *is* the teacher's tensor (one copy of the weights in memory) and adds low-rank layers
  W x + (alpha / r) B A x. Only the LoRA weights (and new layers) are registered as its parameters, so
  optimizers, EMAs, checkpoints and DDP see the adapter alone; the teacher is the bare base tree (the
  adapter disabled). Each LoRA net has its own tree, so nothing switches adapters globally and gradient
  checkpointing recomputes the right one.
- full fine-tuning: a deep copy of the teacher's model.

LCM-style guidance input (Luo et al. 2023): a zero-initialised ``time_embedding.cond_proj`` reads
diffusers' ``get_guidance_scale_embedding(w - 1)``, which is what stock pipelines feed a UNet with
``time_cond_proj_dim`` (``guidance_scale`` w), so the exported student runs unchanged in them.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.errors import FewstepError

ARCHS = ("sd", "sdxl", "sd3", "flux")
# LCM-LoRA's SDXL targets (diffusers' train_lcm_distill_lora_sdxl.py): attention, feed-forward, resnets
LORA_TARGETS = {
    "unet": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
             "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"),
    "sd3": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "attn.to_add_out"),
    # the attention projections of the double-stream blocks (image and text) and of the single-stream blocks
    # (their attn.to_q/k/v; a single block's output projection is its proj_out over attention and MLP)
    "flux": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out"),
}
TRANSFORMER_ARCHS = ("sd3", "flux")  # pipelines whose network is `pipe.transformer` (else `pipe.unet`)
FLUX_DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale
GUIDANCE_EMBED_DIM = 256  # LCM-SDXL's time_cond_proj_dim
ADAPTER = "default"


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of 1000 w (B,) -> (B, dim), as diffusers pipelines compute LCM's guidance input
    (`get_guidance_scale_embedding`, Luo et al. 2023; pipelines pass w = guidance_scale - 1)."""
    w = w.to(torch.float32).reshape(-1) * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GuidanceProjection(nn.Linear):
    """The guidance input of a UNet's time embedding (diffusers' ``cond_proj``): computed in its own
    (trainable, fp32) dtype, returned in the dtype of its input, zero-initialised."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.zeros_(self.weight)

    def forward(self, x):
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


def model_family(arch: str) -> str:
    return arch if arch in TRANSFORMER_ARCHS else "unet"


def native_guidance(model: nn.Module, arch: str) -> bool:
    """True for a guidance-distilled Flux transformer (its config's guidance_embeds): it takes the guidance scale."""
    return arch == "flux" and bool(model.config.get("guidance_embeds", False))


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> Flux's (B, H/2 * W/2, 4C) tokens of 2x2 patches (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise FewstepError(f"Flux packs 2x2 latent patches: latent height and width must be even, got {h}x{w}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a (height, width) latent grid (``FluxPipeline._unpack_latents``)."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Flux's (H/2 * W/2, 3) position ids of the packed tokens: (0, row, column)
    (``FluxPipeline._prepare_latent_image_ids``)."""
    # made on `device` directly: no host-to-device copy (which a CUDA graph capture of the network would refuse)
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3).to(dtype=dtype)


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _call(model: nn.Module, arch: str, x: torch.Tensor, t: torch.Tensor, cond: dict, timestep_cond=None,
          guidance=None):
    if not isinstance(cond, dict) or "prompt_embeds" not in cond:
        raise FewstepError(f"a {arch} network needs text conditions (a dict with 'prompt_embeds'), got "
                           f"{type(cond).__name__}")
    if arch == "flux":
        h, w = x.shape[-2:]
        text = cond["prompt_embeds"]
        # the transformer multiplies timestep (and guidance) by 1000 itself; FluxPipeline passes sigma = t
        with _precise_flux_time(model, t, guidance):
            out = model(hidden_states=pack_latents(x), timestep=t, guidance=guidance, encoder_hidden_states=text,
                        pooled_projections=cond["pooled_prompt_embeds"],
                        txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype),
                        img_ids=latent_image_ids(h, w, x.device, x.dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)
    if arch == "sd3":
        return model(hidden_states=x, timestep=t * 1000.0, encoder_hidden_states=cond["prompt_embeds"],
                     pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
    kwargs = {}
    if arch == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    if timestep_cond is not None:
        kwargs["timestep_cond"] = timestep_cond
    return model(x, t, encoder_hidden_states=cond["prompt_embeds"], return_dict=False, **kwargs)[0]


@contextlib.contextmanager
def _precise_flux_time(model: nn.Module, t: torch.Tensor, guidance):
    """FluxTransformer2DModel rounds timestep and guidance to the network's dtype before multiplying by 1000 (in
    bf16, t = 0.4 lands up to 0.8 timestep units off, and the sinusoidal embedding's derivative along t with it):
    its time embedding gets 1000 t and 1000 w in float32 instead, which changes nothing in float32."""
    exact_t = t.to(torch.promote_types(t.dtype, torch.float32)) * 1000
    exact_w = None if guidance is None else guidance.to(torch.float32) * 1000

    def hook(module, args):
        return (exact_t, *args[1:]) if exact_w is None else (exact_t, exact_w, *args[2:])

    handle = model.time_text_embed.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class DiffusersNet(nn.Module):
    """A diffusers UNet/transformer as ``net(x_t, t, cond, guidance=None) -> native prediction``.

    role "base": a teacher's model (registered, frozen by the trainer); "full": a fully trained copy.
    `source` records where the base pipeline comes from (saved with students, which need it).
    """

    def __init__(self, model: nn.Module, arch: str, source: dict, *, role: str = "base",
                 guidance_embed: bool = False):
        super().__init__()
        if arch not in ARCHS:
            raise FewstepError(f"unknown diffusers architecture {arch!r}; allowed: {', '.join(ARCHS)}")
        self.model = model
        self.arch = arch
        self.source = dict(source)
        self.role = role
        self.guidance_embed = _guidance_input(model, arch, guidance_embed)
        object.__setattr__(self, "_base", model if role == "base" else None)  # not a registered submodule

    # -- what the Denoiser and methods use ------------------------------------------------------
    @property
    def live(self) -> nn.Module:
        """The diffusers model this net runs (its own tree for LoRA nets)."""
        return self.model

    @property
    def base_model(self) -> nn.Module:
        """The teacher's model that derived nets share or copy."""
        if self._base is None:
            raise FewstepError("only a teacher's network (role 'base') can derive students")
        return self._base

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict, guidance=None) -> torch.Tensor:
        model = self.live
        dtype = _float_dtype(model)
        cond = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in cond.items()}
        timestep_cond = flux_guidance = None
        if self.guidance_embed and self.arch == "flux":  # the transformer's own guidance embedding
            w = (torch.full((), FLUX_DEFAULT_GUIDANCE, device=x.device) if guidance is None
                 else torch.as_tensor(guidance))
            flux_guidance = w.to(x.device, torch.float32).expand(x.shape[0])
        elif self.guidance_embed:
            w = torch.ones(x.shape[0], device=x.device) if guidance is None else torch.as_tensor(guidance)
            w = w.to(x.device, torch.float32).expand(x.shape[0])
            timestep_cond = guidance_scale_embedding(w - 1.0, GUIDANCE_EMBED_DIM).to(dtype)
        out = _call(model, self.arch, x.to(dtype), t, cond, timestep_cond, flux_guidance)
        return out.to(x.dtype)

    def bottleneck(self) -> nn.Module:
        """The block whose output is the network's bottleneck feature map (a GAN head reads it with
        `fewstep.models.gan.capture_features`): the UNet's mid block, SD3's middle transformer block, or the middle
        one of Flux's double- then single-stream blocks (each returns (text, image) tokens; the image tokens are
        read)."""
        model = self.live
        if self.arch == "sd3":
            blocks = model.transformer_blocks
            return blocks[len(blocks) // 2]
        if self.arch == "flux":
            blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
            return blocks[len(blocks) // 2]
        return model.mid_block

    def config(self) -> dict:
        cfg = {"type": "diffusers", "arch": self.arch, "source": dict(self.source), "student": self.role}
        if self.guidance_embed:
            cfg["guidance_embed"] = True
        return cfg

    # -- students --------------------------------------------------------------------------------
    def derive(self, *, lora_rank: int | None = None, lora_alpha: float | None = None,
               guidance_embed: bool = False, gradient_checkpointing: bool = False) -> DiffusersNet:
        """A student or fake score made from this teacher: LoRA of rank `lora_rank` on the shared base
        weights, or (rank None/0) a full copy; `guidance_embed` adds LCM's guidance input to a UNet (a
        guidance-distilled Flux transformer has its own, which its students always keep)."""
        base = self.base_model
        if lora_rank:
            return LoraDiffusersNet(base, self.arch, self.source, rank=int(lora_rank),
                                    alpha=float(lora_alpha) if lora_alpha else float(lora_rank),
                                    guidance_embed=guidance_embed, gradient_checkpointing=gradient_checkpointing)
        model = copy.deepcopy(base).requires_grad_(True)
        if guidance_embed and not native_guidance(model, self.arch):
            add_guidance_projection(model, self.arch)
        if gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return DiffusersNet(model, self.arch, self.source, role="full", guidance_embed=guidance_embed)

    def standalone_model(self) -> nn.Module:
        """A self-contained diffusers model of this net (LoRA merged, guidance input in its config), on the CPU
        in float32, for export with `save_pretrained`."""
        state = {k: v.detach().to("cpu", torch.float32) for k, v in self.live.state_dict().items()}
        return _rebuild(self.live, state, self.guidance_embed and not native_guidance(self.live, self.arch))


def _rebuild(model: nn.Module, state: dict, added_guidance: bool) -> nn.Module:
    cfg = dict(model.config)
    if added_guidance:
        cfg["time_cond_proj_dim"] = GUIDANCE_EMBED_DIM
    fresh = type(model).from_config(cfg)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FewstepError(f"cannot rebuild the {type(model).__name__}: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}")
    return fresh.eval()


def _guidance_input(model: nn.Module, arch: str, requested: bool) -> bool:
    """Whether a net over `model` takes the guidance scale: a guidance-distilled Flux transformer always does, other
    transformers never (asking is an error), a UNet when LCM's input was added (`requested`)."""
    if arch in TRANSFORMER_ARCHS:
        if requested and not native_guidance(model, arch):
            add_guidance_projection(model, arch)  # raises: the one-line error
        return native_guidance(model, arch)
    return bool(requested)


def add_guidance_projection(model: nn.Module, arch: str) -> nn.Module:
    """Give a UNet LCM's guidance input: time_embedding.cond_proj (GUIDANCE_EMBED_DIM -> time features), zero."""
    if arch in TRANSFORMER_ARCHS:
        what = ("a Flux transformer without guidance_embeds (e.g. FLUX.1-schnell) has no guidance input"
                if arch == "flux" else "")
        raise FewstepError(f"a guidance-scale input (LCM's guidance_embed) exists for UNet teachers and "
                           f"guidance-distilled Flux only{'; ' + what if what else ''}; for {arch} use "
                           "--opt guidance_embed=false")
    te = model.time_embedding
    proj = GuidanceProjection(GUIDANCE_EMBED_DIM, te.linear_1.in_features, device=te.linear_1.weight.device)
    te.cond_proj = proj
    return proj


def share_weights_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree whose parameters and buffers are the very same tensors (deepcopy with a
    memo that maps each tensor to itself): new containers, no new weights."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class LoraDiffusersNet(DiffusersNet):
    """A LoRA student/fake score: its own module tree over the teacher's tensors, plus peft LoRA layers.

    Registered parameters (what `parameters()`, `state_dict()`, optimizers and DDP see): the LoRA A/B
    matrices and new layers (the guidance input) only. A deep copy (an EMA, CD's target) is another tree
    over the same base with its own copy of the adapter.
    """

    def __init__(self, base: nn.Module, arch: str, source: dict, *, rank: int, alpha: float,
                 guidance_embed: bool = False, gradient_checkpointing: bool = False):
        nn.Module.__init__(self)
        from peft import LoraConfig, inject_adapter_in_model

        if rank < 1:
            raise FewstepError(f"--lora-rank must be >= 1 (0 = full fine-tuning), got {rank}")
        self.arch = arch
        self.source = dict(source)
        self.role = "lora"
        self.guidance_embed = _guidance_input(base, arch, guidance_embed)
        self.rank, self.alpha = int(rank), float(alpha)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        tree = share_weights_copy(base)
        targets = list(LORA_TARGETS[model_family(arch)])
        inject_adapter_in_model(LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=targets,
                                           init_lora_weights=True), tree, adapter_name=ADAPTER)
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_tree", tree)
        self.lora = nn.ModuleDict()
        for name, layer in lora_layers(tree):
            self.lora[name.replace(".", "__")] = nn.ModuleDict({"A": layer.lora_A[ADAPTER], "B": layer.lora_B[ADAPTER]})
        if not len(self.lora):
            raise FewstepError(f"no LoRA target ({', '.join(targets)}) found in the {type(base).__name__}")
        self.extra = nn.ModuleDict()
        if self.guidance_embed and not native_guidance(base, arch):
            self.extra["cond_proj"] = add_guidance_projection(tree, arch)
        if gradient_checkpointing:
            tree.enable_gradient_checkpointing()

    @property
    def live(self) -> nn.Module:
        return self._tree

    def jvp_modules(self) -> list[nn.Module]:
        """The module tree this net runs but does not register (`fewstep.models.jvp.expand_modules`): JVPs hook its
        norm layers, route its attention and cast it for a mixed-precision pass."""
        return [self._tree]

    @property
    def base_model(self) -> nn.Module:
        return self._base

    def spec(self) -> dict:
        return {"lora_rank": self.rank, "lora_alpha": self.alpha, "guidance_embed": self.guidance_embed,
                "gradient_checkpointing": self.gradient_checkpointing}

    def config(self) -> dict:
        cfg = super().config()
        cfg["lora"] = {"rank": self.rank, "alpha": self.alpha, "targets": list(LORA_TARGETS[model_family(self.arch)])}
        return cfg

    def __deepcopy__(self, memo):
        devices = [p.device for p in itertools.islice(self._base.parameters(), 1) if p.device.type == "cuda"]
        with torch.random.fork_rng(devices=devices):  # a copy draws no random numbers from the run's streams
            new = LoraDiffusersNet(self._base, self.arch, self.source, rank=self.rank, alpha=self.alpha,
                                   guidance_embed=self.guidance_embed,
                                   gradient_checkpointing=self.gradient_checkpointing)
        with torch.no_grad():
            for dst, src in zip(new.parameters(), self.parameters(), strict=True):
                dst.copy_(src)
                dst.requires_grad_(src.requires_grad)
        new.train(self.training)
        memo[id(self)] = new
        return new

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter as `save_lora_weights` takes it: peft's keys (``...to_q.lora_A.weight``; diffusers' older
        ``lora.down``/``lora.up`` names lose the attention layers on reload), alpha folded into B (scale 1)."""
        from peft.utils import get_peft_model_state_dict

        if "cond_proj" in self.extra:
            raise FewstepError("this student has a guidance-scale input (LCM-style cond_proj) that a LoRA file cannot "
                               "carry: export --format diffusers, or distill with --opt guidance_embed=false")
        state = get_peft_model_state_dict(self._tree, adapter_name=ADAPTER)
        scale = self.alpha / self.rank
        return {k: (v * scale if "lora_B" in k else v).detach().to("cpu", torch.float32).contiguous()
                for k, v in state.items()}

    def standalone_model(self) -> nn.Module:
        tree = copy.deepcopy(self._tree)  # a full copy (base weights included) that merging may change
        for name, layer in list(lora_layers(tree)):
            layer.merge(adapter_names=[ADAPTER])
            parent_name, _, child = name.rpartition(".")
            parent = tree.get_submodule(parent_name) if parent_name else tree
            setattr(parent, child, layer.get_base_layer())
        state = {k: v.detach().to("cpu", torch.float32) for k, v in tree.state_dict().items()}
        return _rebuild(self._base, state, "cond_proj" in self.extra)


def lora_layers(model: nn.Module):
    """(name, peft LoRA layer) pairs of a model."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
