"""CLIP score (Hessel et al. 2021) of images against their prompts, with a local CLIP model.

score = 100 * max(cos(E_img(x), E_txt(p)), 0), averaged over images: torchmetrics' convention
(which uses ViT-L/14). DMD2's evaluator reports the raw cosine with an "A photo depicts" prefix
instead; the convention and the model are recorded with every score so numbers are not mixed.

The model is a transformers `CLIPModel` folder (config.json + weights + tokenizer files) loaded with
`from_pretrained(path, local_files_only=True)`; nothing is downloaded. Images are prepared here,
the way CLIP's image processor does it: uint8 RGB (greyscale repeated), bicubic resize of the
shorter side to `size`, centre crop to `crop_size`, scale to [0, 1], normalise by the mean/std of
the folder's preprocessor_config.json (OpenAI CLIP's values when it has none).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fewstep.devices import resolve_device
from fewstep.errors import FewstepError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONVENTION = "100 * max(cos(image, text), 0), mean over images"


def _edge(value, default: int) -> int:
    """An int from preprocessor sizes written as int, {"shortest_edge": n} or {"height": n, "width": n}."""
    if value is None:
        return default
    if isinstance(value, dict):
        for key in ("shortest_edge", "height", "width"):
            if key in value:
                return int(value[key])
        return default
    return int(value)


class CLIPScorer:
    """A local CLIP model with its tokenizer and image preparation; call `score(images, prompts)`."""

    def __init__(self, path: str | Path, device=None, batch_size: int = 32):
        from transformers import AutoTokenizer, CLIPModel

        self.path = Path(path)
        if not (self.path.is_dir() and (self.path / "config.json").is_file()):
            raise FewstepError(f"--clip {str(path)!r} is not a CLIP model folder (config.json, weights and tokenizer "
                               "files, e.g. from CLIPModel.save_pretrained); nothing is downloaded")
        try:
            self.model = CLIPModel.from_pretrained(str(self.path), local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise FewstepError(f"cannot load CLIP from {str(path)!r}: {str(e).splitlines()[0]}") from None
        self.device = resolve_device(device)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.batch_size = int(batch_size)
        image_size = int(self.model.config.vision_config.image_size)
        pre = {}
        pre_file = self.path / "preprocessor_config.json"
        if pre_file.is_file():
            pre = json.loads(pre_file.read_text())
        self.size = _edge(pre.get("size"), image_size)
        self.crop = _edge(pre.get("crop_size"), image_size) if pre.get("do_center_crop", True) else self.size
        self.mean = torch.tensor(pre.get("image_mean", OPENAI_CLIP_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", OPENAI_CLIP_STD), dtype=torch.float32).view(1, 3, 1, 1)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def weights_sha256(self) -> dict:
        """sha256 of each weights file of the local model folder (safetensors or bin)."""
        from fewstep.eval.inception import file_sha256

        root = Path(self.path)
        files = sorted(p for p in root.glob("*") if p.suffix in (".safetensors", ".bin")) if root.is_dir() else []
        return {p.name: file_sha256(p) for p in files}

    def describe(self) -> dict:
        cfg = self.model.config
        return {"path": str(self.path), "model_type": cfg.model_type, "weights_sha256": self.weights_sha256(),
                "vision": f"image {cfg.vision_config.image_size}, patch {cfg.vision_config.patch_size}, "
                          f"width {cfg.vision_config.hidden_size}, layers {cfg.vision_config.num_hidden_layers}",
                "projection_dim": int(cfg.projection_dim), "preprocess": {"resize_shorter_side": self.size,
                                                                          "center_crop": self.crop}}

    def pixel_values(self, images) -> torch.Tensor:
        """uint8 or [-1, 1] images (N, C, H, W) -> normalised CLIP input (N, 3, crop, crop)."""
        from PIL import Image

        from fewstep.eval.inception import to_uint8_images

        x = to_uint8_images(images).numpy()
        out = []
        for a in x:
            im = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)).convert("RGB")
            w, h = im.size
            # transformers' shortest_edge resize: the short side becomes `size`, the long side is truncated
            new = (self.size, int(self.size * h / w)) if w <= h else (int(self.size * w / h), self.size)
            im = im.resize((max(1, new[0]), max(1, new[1])), Image.Resampling.BICUBIC)
            w, h = im.size
            left, top = (w - self.crop) // 2, (h - self.crop) // 2
            im = im.crop((left, top, left + self.crop, top + self.crop))
            out.append(np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        t = torch.from_numpy(np.stack(out))
        return (t - self.mean) / self.std

    @torch.no_grad()
    def cosines(self, images, prompts: list[str]) -> torch.Tensor:
        """cos(E_img, E_txt) per (image, prompt) pair (N,)."""
        n = int(torch.as_tensor(images).shape[0]) if not isinstance(images, list) else len(images)
        if n != len(prompts):
            raise FewstepError(f"{n} images but {len(prompts)} prompts")
        cos = []
        for i in range(0, n, self.batch_size):
            pix = self.pixel_values(images[i:i + self.batch_size]).to(self.device)
            enc = self.tokenizer(list(prompts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            out = self.model(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"), pixel_values=pix)
            img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
            txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
            cos.append((img * txt).sum(-1).double().cpu())
        return torch.cat(cos)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (surrounding whitespace stripped, empty lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise FewstepError(f"--prompts {str(path)!r} does not exist (a text file, one prompt per line)")
    prompts = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        raise FewstepError(f"--prompts {str(path)!r} holds no prompts")
    return prompts


def compute_clip_score(samples, prompts, *, clip: str | Path, batch_size: int = 32, device=None,
                       progress=None) -> dict:
    """CLIP score of `samples` (image folder or samples .npz, in file order) against `prompts`
    (a list, or a text file with one prompt per line; a single prompt applies to every image)."""
    from fewstep.eval.sources import ImageFolderSamples, NpzSamples

    if batch_size < 1:
        raise FewstepError(f"--batch-size must be >= 1, got {batch_size}")
    prompt_file = None
    if isinstance(prompts, (str, Path)):
        prompt_file = str(prompts)
        prompts = read_prompts(prompts)
    prompts = [str(p) for p in prompts]
    path = Path(str(samples))
    if path.is_file() and path.suffix == ".npz":
        source = NpzSamples(path, batch_size)
    elif path.is_dir():
        source = ImageFolderSamples(path, batch_size)
    else:
        raise FewstepError(f"--samples {str(samples)!r}: CLIP score reads an image folder or a samples .npz "
                           "(generate text-conditional samples first)")
    if len(prompts) not in (1, source.total):
        raise FewstepError(f"{source.total} images but {len(prompts)} prompts (give one prompt per image, in file "
                           "order, or a single prompt for all)")
    if len(prompts) == 1:
        prompts = prompts * source.total
    scorer = CLIPScorer(clip, device, batch_size)
    cos, done = [], 0
    for batch in source.batches():
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            imgs = item if item.ndim == 4 else item[None]
            cos.append(scorer.cosines(imgs, prompts[done:done + imgs.shape[0]]))
            done += imgs.shape[0]
        if progress is not None:
            progress("images", sum(int(i.shape[0]) if i.ndim == 4 else 1 for i in items), source.total)
    c = torch.cat(cos)
    scores = 100.0 * c.clamp_min(0)
    return {
        "metric": "clip",
        "value": float(scores.mean()),
        "clip_score": float(scores.mean()),
        "clip_score_std": float(scores.std()) if scores.numel() > 1 else 0.0,
        "mean_cosine": float(c.mean()),
        "lower_is_better": False,
        "n_samples": int(c.numel()),
        "samples": source.describe(),
        "prompts": prompt_file or "<list>",
        "seed": None,  # no randomness: the score of given images
        "protocol": {"metric": "clip score", "convention": CONVENTION, "model": scorer.describe(),
                     "prompt_prefix": None},
    }
