"""A diffusers text-to-image pipeline as a fewstep Denoiser plus the pieces around its network.

`denoiser_from_pipeline` wraps the pipeline's UNet (SD1.x/SD2.x: eps or v prediction; SDXL) or SD3/Flux
transformer into a `Denoiser` over latents: the VP process of its scheduler config
(`VPDiscrete.from_diffusers_config`) or rectified flow x_t = (1 - t) x0 + t eps for flow-matching
transformers (diffusers' FlowMatch sigma is t, its timestep 1000 t; the network predicts the velocity
eps - x0, fewstep's "flow"). The scheduler's shift only changes which times the stock pipeline samples; it is
recorded as meta["flow_shift"] (SD3: the config's shift; Flux: exp(mu) of its resolution-dependent shift at the
Denoiser's resolution, see `flux_shift`), and fewstep's own samplers keep their spacing (uniform by default).
Methods see only D(x_t, t, cond) -> x0.

`TextToImageParts` (``denoiser.components``) holds what the network does not: the pipeline's own
prompt encoder (so conditions are exactly what the stock pipeline feeds the network), the empty-prompt
null condition for CFG (zeros where SDXL's ``force_zeros_for_empty_prompt`` says so), and the VAE with
its scaling (and SD3's shift) to encode real images and decode samples.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from fewstep.errors import FewstepError
from fewstep.models.denoiser import Denoiser
from fewstep.models.diffusers_nets import DiffusersNet

SUPPORTED_PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                       "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's max_sequence_length (T5 tokens), which fewstep's prompts use too
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
PROBE_PROMPTS = ["", "a photo of a cat"]
PROMPT_CACHE_BYTES = 1 << 30  # conditions a pipeline keeps in memory, least recently used dropped (1 GiB: ~1600
# SDXL prompts, 128-256 Flux ones with their 512 T5 tokens)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in tensors.values())


def hub_hint(source: str) -> str:
    return (f"download it where the Hugging Face hub is reachable (`hf download {source}`, which fills the cache "
            f"this machine reads) or pass a local pipeline folder (--teacher /path/to/folder with model_index.json)")


def load_pipeline(source: str, *, dtype: torch.dtype | None = None, name: str | None = None):
    """A diffusers pipeline from a local folder or a hub id: the local cache first, the hub only when it is
    allowed (HF_HUB_OFFLINE unset); any failure is one FewstepError line saying how to get the model."""
    import huggingface_hub.constants as hub_constants
    from diffusers import DiffusionPipeline

    shown = f"{name!r} ({source})" if name and name != source else repr(source)
    if not Path(name or source).exists():
        shown += " (no local folder of that name exists either)"
    path = Path(source)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FewstepError(f"{str(path)!r} is not a diffusers pipeline folder (no model_index.json)")
        try:
            index = json.loads((path / "model_index.json").read_text())
            # components saved as [null, null] (e.g. SD3 without T5) are passed as None, as diffusers asks
            kwargs.update({k: None for k, v in index.items() if not k.startswith("_") and v == [None, None]})
            pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise FewstepError(f"cannot load the diffusers pipeline in {str(path)!r}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    else:
        try:
            pipe = DiffusionPipeline.from_pretrained(source, local_files_only=True, **kwargs)
        except Exception:  # noqa: BLE001 - not (completely) in the cache: try the hub if allowed
            if hub_constants.HF_HUB_OFFLINE:
                raise FewstepError(f"teacher {shown} is not in the local Hugging Face cache and the hub is off "
                                   f"(HF_HUB_OFFLINE): {hub_hint(source)}") from None
            try:
                pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
            except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one line for each
                raise FewstepError(f"teacher {shown} is not cached and could not be downloaded "
                                   f"({type(e).__name__}): {hub_hint(source)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_arch(pipe) -> str:
    name = type(pipe).__name__
    if name not in SUPPORTED_PIPELINES:
        raise FewstepError(f"unsupported diffusers pipeline {name}; supported: {', '.join(SUPPORTED_PIPELINES)}")
    return SUPPORTED_PIPELINES[name]


def parse_resolution(value) -> tuple[int, int] | None:
    """`1024`, `"768x1344"` (height x width), (h, w) or None."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        h, w = value
    else:
        text = str(value).lower().strip()
        try:
            h, w = (int(v) for v in text.split("x")) if "x" in text else (int(text), int(text))
        except ValueError:
            raise FewstepError(f"--resolution must be N or HxW (e.g. 1024 or 768x1344), got {value!r}") from None
    h, w = int(h), int(w)
    if h < 1 or w < 1:
        raise FewstepError(f"--resolution must be positive, got {value!r}")
    return h, w


class TextToImageParts:
    """Prompt encoder, null condition and VAE of a text-to-image pipeline (shared, never deep-copied)."""

    def __init__(self, pipe, arch: str, resolution: tuple[int, int]):
        from collections import OrderedDict

        self.pipe = pipe
        self.arch = arch
        self.resolution = tuple(resolution)
        self._fingerprint = None
        # prompt -> its conditions (CPU, batch 1): each unique prompt is encoded once per process
        self._prompt_cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._prompt_cache_bytes = 0
        self.prompt_cache_hits = self.prompt_cache_misses = 0

    def __deepcopy__(self, memo):
        return self

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.pipe.text_encoder.device

    def to(self, device) -> TextToImageParts:
        """Move the text encoders and the VAE (the network is moved with its Denoiser)."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.to(device)
        return self

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU (their outputs are cached; prompts still encode, more slowly)."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.to("cpu")

    # -- text -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], batch_size: int = 32, *,
                       cache: bool = True) -> dict[str, torch.Tensor]:
        """Conditions for `prompts` (CPU tensors, batch first), computed by the pipeline's `encode_prompt`. Each
        unique prompt is encoded once (in batches of `batch_size`); with `cache`, the conditions of the most
        recently used prompts are kept in memory (up to PROMPT_CACHE_BYTES) for later calls."""
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise FewstepError("no prompts to encode")
        store = self._prompt_cache
        missing = [p for p in dict.fromkeys(prompts) if p not in store]
        self.prompt_cache_misses += len(missing)
        self.prompt_cache_hits += len(prompts) - len(missing)
        fresh: dict[str, dict[str, torch.Tensor]] = {}
        for i in range(0, len(missing), batch_size):
            chunk = missing[i:i + batch_size]
            encoded = self._encode(chunk)
            for j, p in enumerate(chunk):
                fresh[p] = {k: v[j:j + 1].clone() for k, v in encoded.items()}
        rows = [fresh[p] if p in fresh else store[p] for p in prompts]
        out = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        if cache:
            for p in dict.fromkeys(prompts):  # most recently used last
                if p in fresh:
                    entry = fresh[p]
                    self._prompt_cache_bytes += _nbytes(entry)
                else:
                    entry = store.pop(p)
                store[p] = entry
            while store and self._prompt_cache_bytes > PROMPT_CACHE_BYTES:
                self._prompt_cache_bytes -= _nbytes(store.popitem(last=False)[1])
        return out

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pipe, dev = self.pipe, self.device
        if self.arch == "sd":
            embeds, _ = pipe.encode_prompt(prompts, dev, 1, False)
            return {"prompt_embeds": embeds.cpu()}
        if self.arch == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=dev, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            return {"prompt_embeds": embeds.cpu(), "text_embeds": pooled.cpu(),
                    "time_ids": self.time_ids(len(prompts), embeds.dtype)}
        if self.arch == "flux":  # text_ids are zeros of the text length: the network makes them
            embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=dev, num_images_per_prompt=1,
                                                   max_sequence_length=FLUX_MAX_SEQUENCE_LENGTH)
            return {"prompt_embeds": embeds.cpu(), "pooled_prompt_embeds": pooled.cpu()}
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=dev, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds.cpu(), "pooled_prompt_embeds": pooled.cpu()}

    def time_ids(self, n: int, dtype=torch.float32) -> torch.Tensor:
        """SDXL's micro-conditioning (original size, crop top-left, target size) for uncropped images at the
        configured resolution, as the pipeline's `_get_add_time_ids` builds it."""
        h, w = self.resolution
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype).repeat(n, 1)

    def null_condition(self) -> dict[str, torch.Tensor]:
        """The unconditional input for CFG (batch 1): the empty prompt, or zeros for SDXL pipelines with
        force_zeros_for_empty_prompt (what the stock pipeline uses as negative when none is given). Guidance-distilled
        Flux never uses it (its guidance scale is a network input); FLUX.1-schnell uses it as FluxPipeline's
        true-CFG negative prompt "" does."""
        cond = self.encode_prompts([""])
        if self.arch == "sdxl" and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            cond = {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in cond.items()}
        return cond

    def fingerprint(self) -> str:
        """A short hash of what the encoders compute (their outputs on probe prompts and a probe image):
        cached conditions and latents are reused only by the same encoders at the same resolution."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps([self.arch, type(self.pipe).__name__, list(self.resolution)]).encode())
            for k, v in sorted(self.encode_prompts(PROBE_PROMPTS).items()):
                h.update(k.encode())
                h.update(v.to(torch.float32).contiguous().numpy().tobytes())
            probe = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
            h.update(self.encode_images(probe).to(torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # -- latents ----------------------------------------------------------------------------------
    def _vae_dtype(self):
        vae = self.vae
        if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(torch.float32)  # as the pipelines do: the SDXL VAE overflows in fp16
        return vae.dtype

    def _latent_stats(self, like: torch.Tensor):
        cfg = self.vae.config
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if self.arch == "sdxl" and mean is not None and std is not None:
            c = like.shape[1]
            return (torch.tensor(mean).view(1, c, 1, 1).to(like), torch.tensor(std).view(1, c, 1, 1).to(like))
        return None

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Latents of images in [-1, 1] (N, 3, H, W): the mean of the VAE posterior, scaled (and shifted) as the
        network expects: (z - shift) * scale, or (z - mean) * scale / std for SDXL VAEs with latent statistics."""
        cfg = self.vae.config
        dtype = self._vae_dtype()
        out = []
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(self.vae.device, dtype)
            z = self.vae.encode(x).latent_dist.mean.float()
            stats = self._latent_stats(z)
            if stats is not None:
                z = (z - stats[0]) * cfg.scaling_factor / stats[1]
            else:
                z = (z - (cfg.get("shift_factor") or 0.0)) * cfg.scaling_factor
            out.append(z.cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Images in [-1, 1] (CPU, float32) from latents, as the stock pipeline decodes them, `batch_size` at a time
        on the VAE's device."""
        cfg = self.vae.config
        dtype = self._vae_dtype()
        out = []
        for i in range(0, latents.shape[0], batch_size):
            z = latents[i:i + batch_size].to(self.vae.device, torch.float32)
            stats = self._latent_stats(z)
            if stats is not None:
                z = z * stats[1] / cfg.scaling_factor + stats[0]
            else:
                z = z / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
            out.append(self.vae.decode(z.to(dtype), return_dict=False)[0].float().cpu())
        return torch.cat(out)


def flux_shift(sched: dict, resolution: tuple[int, int], vae_factor: int) -> tuple[float, float]:
    """(mu, exp(mu)): FluxPipeline's resolution-dependent time shift for images of `resolution` (height, width),
    mu linear in the number of packed latent tokens (H / vae / 2) (W / vae / 2) between (base_image_seq_len,
    base_shift) and (max_image_seq_len, max_shift) (`calculate_shift`). Its exponential shift
    sigma' = e^mu / (e^mu + 1 / sigma - 1) is SD3's shift s' = k s / (1 + (k - 1) s) with k = e^mu (FLUX.1-dev at
    1024x1024: 4096 tokens, mu = 1.15, k = 3.16)."""
    tokens = (resolution[0] // vae_factor // 2) * (resolution[1] // vae_factor // 2)
    lo, hi = float(sched.get("base_image_seq_len", 256)), float(sched.get("max_image_seq_len", 4096))
    s_lo, s_hi = float(sched.get("base_shift", 0.5)), float(sched.get("max_shift", 1.15))
    mu = s_lo + (s_hi - s_lo) * (tokens - lo) / (hi - lo)
    return mu, math.exp(mu)


def denoiser_from_pipeline(pipe, source: str, *, resolution=None, name: str | None = None) -> Denoiser:
    """The teacher Denoiser of a loaded text-to-image pipeline (network on the pipeline's device)."""
    from fewstep.diffusion.processes import RectifiedFlow, VPDiscrete
    from fewstep.models.diffusers_nets import FLUX_DEFAULT_GUIDANCE, TRANSFORMER_ARCHS, native_guidance

    arch = pipeline_arch(pipe)
    model = pipe.transformer if arch in TRANSFORMER_ARCHS else pipe.unet
    sched = dict(pipe.scheduler.config)
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if arch == "flux":  # no sample size in Flux's transformer config: the VAE's (1024 px for FLUX.1, FluxPipeline's
        # default of 128 latents too; the tiny random pipelines' 16 px), else FluxPipeline's
        pixels = pipe.vae.config.get("sample_size") or pipe.default_sample_size * vae_factor
        pixels = int(pixels[0] if isinstance(pixels, (list, tuple)) else pixels)
        default = (pixels, pixels)
    else:
        size = int(model.config.sample_size)
        default = (size * vae_factor, size * vae_factor)
    res = parse_resolution(resolution) or default
    if arch == "flux":  # 2x2 latent patches are packed into one token
        multiple = vae_factor * 2 * int(model.config.patch_size)
    else:
        multiple = vae_factor * (int(model.config.patch_size) if arch == "sd3"
                                 else 2 ** (len(model.config.block_out_channels) - 1))
    if res[0] % multiple or res[1] % multiple:
        raise FewstepError(f"--resolution {res[0]}x{res[1]} must be a multiple of {multiple} for this {arch} model")
    meta = {"kind": "text2image", "arch": arch, "pipeline": type(pipe).__name__, "source": str(source),
            "teacher_name": name or str(source), "resolution": list(res), "data": None,
            "noise_stream": "sequential"}
    if arch in TRANSFORMER_ARCHS:
        if type(pipe.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            raise FewstepError(f"an {arch} teacher needs FlowMatchEulerDiscreteScheduler, got "
                               f"{type(pipe.scheduler).__name__}")
        process, prediction = RectifiedFlow(), "flow"
        meta.update(default_solver="euler", default_steps=28, default_spacing="uniform",
                    flow_shift=float(sched.get("shift", 1.0)))
        if arch == "flux":
            if sched.get("use_dynamic_shifting"):
                mu, k = flux_shift(sched, res, vae_factor)
                meta.update(flow_shift=k, flow_shift_mu=mu)
            if native_guidance(model, arch):  # guidance-distilled (FLUX.1-dev): the scale is a network input
                meta["default_guidance"] = FLUX_DEFAULT_GUIDANCE
    else:
        if sched.get("rescale_betas_zero_snr"):
            raise FewstepError("schedulers with rescale_betas_zero_snr (zero terminal SNR) are not supported yet")
        pred = sched.get("prediction_type", "epsilon")
        if pred not in PREDICTIONS:
            raise FewstepError(f"unsupported prediction_type {pred!r}; allowed: {', '.join(PREDICTIONS)}")
        process, prediction = VPDiscrete.from_diffusers_config(sched), PREDICTIONS[pred]
        meta.update(default_solver="dpm++2m", default_steps=25, default_spacing="trailing")
    parts = TextToImageParts(pipe, arch, res)
    channels = int(model.config.in_channels) // (4 if arch == "flux" else 1)  # Flux's in_channels are packed 2x2
    data_shape = (channels, res[0] // vae_factor, res[1] // vae_factor)
    net = DiffusersNet(model.eval().requires_grad_(False), arch, {"path": str(source)})
    den = Denoiser(net, process, prediction, cond_kind="text", null_cond=parts.null_condition(),
                   data_shape=data_shape, meta=meta)
    den.components = parts
    return den.eval()


def load_diffusers_denoiser(directory: str | Path, cfg: dict, device="cpu", *, dtype=None) -> Denoiser:
    """A student saved by `save_denoiser` from a diffusers teacher: its base pipeline (from the recorded
    source, in `dtype`, None: as stored) with the saved LoRA adapter or full weights (safetensors) on top."""
    from fewstep.diffusion.processes import process_from_config
    from fewstep.models.weights import load_weights

    directory = Path(directory)
    net_cfg, den_cfg, meta = cfg["network"], cfg["denoiser"], cfg.get("meta", {})
    source = (net_cfg.get("source") or {}).get("path")
    if not source:
        raise FewstepError(f"{str(directory / 'config.json')!r} does not say which pipeline the student was made from")
    try:
        pipe = load_pipeline(source, dtype=dtype, name=meta.get("teacher_name"))
    except FewstepError as e:
        raise FewstepError(f"the student in {str(directory)!r} needs its teacher pipeline: {e}") from None
    teacher = denoiser_from_pipeline(pipe, source, resolution=meta.get("resolution"), name=meta.get("teacher_name"))
    role = net_cfg.get("student", "base")
    guidance = bool(net_cfg.get("guidance_embed", False))
    if role == "lora":
        lora = net_cfg.get("lora") or {}
        net = teacher.net.derive(lora_rank=int(lora["rank"]), lora_alpha=float(lora["alpha"]), guidance_embed=guidance)
    elif role == "full":
        from fewstep.models.diffusers_nets import add_guidance_projection, native_guidance

        net = teacher.net
        if guidance and not native_guidance(net.model, net.arch):
            add_guidance_projection(net.model, net.arch)
        net.role, net.guidance_embed = "full", guidance
    else:
        net = teacher.net
    load_weights(net, directory / "model.safetensors", "the student network")
    den = Denoiser(net.requires_grad_(False), process_from_config(den_cfg["process"]), den_cfg["prediction"],
                   cond_kind="text", null_cond=teacher._null_cond, data_shape=den_cfg.get("data_shape"),
                   meta=meta, boundary=den_cfg.get("boundary"))
    den.components = teacher.components
    teacher.net.to(device)  # the base weights (a LoRA student shares them)
    den.to(device)
    teacher.components.to(device)
    return den.eval()
