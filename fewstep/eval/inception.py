"""Inception-v3 pool3 features for FID (Heusel et al. 2017), from the standard 2015-12-05 weights.

Two weight files are accepted, both the TensorFlow graph `inception-2015-12-05` that FID is defined on:

- pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth`, loaded (weights_only) into
  `FIDInceptionV3` below: torchvision's Inception-v3 layout with the FID patches (average pools that
  exclude padding in the A, C and first E blocks, a max pool in the last E block, 1008 classes);
- the TorchScript `inception-2015-12-05.pt` used by clean-fid, StyleGAN2-ADA and EDM, whose
  `layers` module maps normalised 299x299 images to the 2048-d features.

Images go in as [-1, 1] floats (or uint8) and are quantised to uint8 first, as if written to PNG.
Resize modes (recorded in every result, because they change the number):

- `clean` (clean-fid, Parmar et al. 2022): PIL bicubic with antialiasing, on each channel as a
  float32 image, to 299x299; then (x - 128) / 128.
- `legacy` (pytorch-fid): F.interpolate(bilinear, align_corners=False) of x / 255 to 299x299;
  then 2 x - 1.

Greyscale images are repeated to 3 channels.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fewstep.errors import FewstepError

PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid
TORCHSCRIPT_NAME = "inception-2015-12-05.pt"  # clean-fid, StyleGAN2-ADA, EDM
FEATURE_DIM = 2048
INPUT_SIZE = 299
RESIZE_MODES = ("clean", "legacy")
NORMALIZATION = {"clean": "(x - 128) / 128 on [0, 255]", "legacy": "2 x - 1 on [0, 1]"}
FEATURE_NAME = "inception-v3-2015-12-05 pool3 (2048-d)"


# -- the network -------------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU, named `conv` and `bn` as in torchvision."""

    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x):
    # TensorFlow's average pool ignores the padded zeros
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_no_pad(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_no_pad(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _FIDInceptionE(nn.Module):
    max_pool = False  # the pooling branch: average pool without padding, or a max pool

    def __init__(self, cin: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def pool(self, x):
        if self.max_pool:
            return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return _avg_pool_no_pad(x)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(self.pool(x))], 1)


class FIDInceptionE_1(_FIDInceptionE):  # noqa: N801 - the name used by pytorch-fid
    """Mixed_7b: average pool excluding padding."""


class FIDInceptionE_2(_FIDInceptionE):  # noqa: N801
    """Mixed_7c: the FID graph uses a max pool here (where the paper's Inception has an average pool)."""

    max_pool = True


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (TF graph 2015-12-05) with torchvision's layer names, so pytorch-fid's
    state dict loads with strict=True. `forward` gives pool3 features (N, 2048) of normalised
    (N, 3, 299, 299) images in [-1, 1]; `logits` the 1008-way classifier."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)
        self.fc = nn.Linear(FEATURE_DIM, 1008)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def logits(self, x):
        return self.fc(self.forward(x))


# -- finding and loading the weights -----------------------------------------------------------------
def torch_hub_checkpoints() -> Path:
    """`$TORCH_HOME/hub/checkpoints` (default `~/.cache/torch/hub/checkpoints`), where pytorch-fid caches."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
    return Path(home) / "hub" / "checkpoints"


def default_inception_candidates() -> list[Path]:
    """Where the standard files are looked for, in order: torch hub's cache (both names), clean-fid's
    download folder (the temp dir), and StyleGAN/EDM's dnnlib cache (`<hash>_inception-2015-12-05.pt`)."""
    hub = torch_hub_checkpoints()
    found = [hub / PTH_NAME, hub / TORCHSCRIPT_NAME]
    # clean-fid downloads into the literal /tmp on Linux, whatever TMPDIR says
    for tmp in dict.fromkeys([Path(tempfile.gettempdir()), Path("/tmp")]):
        found.append(tmp / TORCHSCRIPT_NAME)
    dnnlib = Path(os.environ.get("DNNLIB_CACHE_DIR") or Path(os.path.expanduser("~")) / ".cache" / "dnnlib")
    if (dnnlib / "downloads").is_dir():
        found += sorted((dnnlib / "downloads").glob(f"*_{TORCHSCRIPT_NAME}"))
    return found


def missing_weights_message() -> str:
    return (f"Inception weights not found: place {PTH_NAME} (pytorch-fid) or {TORCHSCRIPT_NAME} (clean-fid/EDM "
            f"TorchScript) in {torch_hub_checkpoints()}/ (set TORCH_HOME to move it), or pass --inception PATH")


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The weight file to use: `path` if given (it must exist), else the first standard location that has one."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FewstepError(f"--inception {str(path)!r} does not exist; expected {PTH_NAME} or {TORCHSCRIPT_NAME}")
        return p
    for p in default_inception_candidates():
        if p.is_file():
            return p
    raise FewstepError(missing_weights_message())


_HASHES: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (cached by path, size and modification time)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive (a zip with code/ and constants.pkl), False for a plain state dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_fid_inception_state_dict(path: str | Path) -> FIDInceptionV3:
    """FIDInceptionV3 with pytorch-fid's state dict loaded strictly (no unpickling: weights_only=True).

    Files saved before BatchNorm had `num_batches_tracked` lack that (unused) counter; it is filled with 0.
    """
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise FewstepError(f"cannot read Inception state dict {str(path)!r}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict):
        raise FewstepError(f"{str(path)!r} is not a state dict (expected pytorch-fid's {PTH_NAME})")
    return fid_inception_from_state_dict(state, str(path))


def fid_inception_from_state_dict(state: dict, name: str = "state dict") -> FIDInceptionV3:
    """FIDInceptionV3 (eval mode, no grads) with `state` loaded with strict=True; missing BatchNorm
    `num_batches_tracked` counters (never used in eval mode) are filled with 0."""
    net = FIDInceptionV3()
    state = dict(state)
    for key, buf in net.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(buf)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise FewstepError(f"{name!r} is not the FID Inception state dict ({first[:200]})") from None
    return net.eval().requires_grad_(False)


# -- resizing ----------------------------------------------------------------------------------------
def check_resize(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise FewstepError(f"unknown resize mode {mode!r}; allowed: {', '.join(RESIZE_MODES)}")
    return mode


def to_uint8_images(images) -> torch.Tensor:
    """(N, C, H, W) uint8 from uint8 input or [-1, 1] floats (rounded as when saving a PNG)."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise FewstepError(f"Inception features need images (N, C, H, W); got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        raise FewstepError(f"Inception features need 1 or 3 channels, got {x.shape[1]}")
    if x.dtype == torch.uint8:
        return x.cpu()
    x = x.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise FewstepError("images contain non-finite values (NaN or inf): the generator diverged")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _resize_clean_one(img: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 -> (C, 299, 299) float32 in [0, 255]: PIL bicubic per channel in float32 (mode "F"),
    clipped to [0, 255] as clean-fid does (bicubic overshoots at edges)."""
    from PIL import Image

    out = np.empty((img.shape[0], INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    for c in range(img.shape[0]):
        channel = Image.fromarray(img[c].astype(np.float32))  # mode "F"
        resized = np.asarray(channel.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC), dtype=np.float32)
        out[c] = resized.clip(0.0, 255.0)
    return out


def inception_input(images, resize: str) -> torch.Tensor:
    """Images (uint8 or [-1, 1] floats, 1 or 3 channels) -> normalised (N, 3, 299, 299) float32."""
    check_resize(resize)
    x = to_uint8_images(images)
    if resize == "clean":
        arr = x.numpy()
        y = torch.from_numpy(np.stack([_resize_clean_one(a) for a in arr])) if len(arr) else \
            torch.empty(0, x.shape[1], INPUT_SIZE, INPUT_SIZE)
        y = (y - 128.0) / 128.0
    else:
        y = F.interpolate(x.float() / 255.0, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        y = 2.0 * y - 1.0
    if y.shape[1] == 1:
        y = y.expand(-1, 3, -1, -1)
    return y.contiguous()


# -- the extractor -----------------------------------------------------------------------------------
class InceptionFeatures:
    """Callable: images -> (N, 2048) float64 pool3 features, with the protocol it used in `.protocol`."""

    def __init__(self, path: str | Path | None = None, resize: str = "clean", device=None, batch_size: int = 32):
        self.path = find_inception_weights(path)
        self.resize = check_resize(resize)
        self.device = torch.device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise FewstepError(f"batch size must be >= 1, got {batch_size}")
        self.torchscript = is_torchscript(self.path)
        if self.torchscript:
            try:
                base = torch.jit.load(str(self.path), map_location=self.device).eval()
            except Exception as e:  # noqa: BLE001
                raise FewstepError(f"cannot load TorchScript Inception {str(self.path)!r}: "
                                   f"{type(e).__name__}") from None
            if not hasattr(base, "layers"):
                raise FewstepError(f"{str(self.path)!r} is a TorchScript file without the `layers` module of "
                                   f"{TORCHSCRIPT_NAME}")
            self.net = base.layers
        else:
            self.net = load_fid_inception_state_dict(self.path).to(self.device)
        self.sha256 = file_sha256(self.path)

    @property
    def protocol(self) -> dict:
        return {
            "feature_extractor": FEATURE_NAME,
            "weights_file": self.path.name,
            "weights_format": "torchscript" if self.torchscript else "pytorch-fid state dict",
            "weights_sha256": self.sha256,
            "resize": self.resize,
            "resize_detail": ("PIL bicubic (antialiased), float32 per channel, to 299x299" if self.resize == "clean"
                              else "F.interpolate bilinear, align_corners=False, to 299x299"),
            "normalization": NORMALIZATION[self.resize],
            "quantization": "uint8 (as saved to PNG)",
            "feature_dim": FEATURE_DIM,
        }

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        x = to_uint8_images(images)
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            inp = inception_input(x[i:i + self.batch_size], self.resize).to(self.device)
            f = self.net(inp).reshape(inp.shape[0], -1)
            if f.shape[1] != FEATURE_DIM:
                raise FewstepError(f"the Inception network gave {f.shape[1]}-d features, expected {FEATURE_DIM}")
            out.append(f.double().cpu())
        return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM, dtype=torch.float64)


@lru_cache(maxsize=2)
def _cached_extractor(path: str, size: int, mtime_ns: int, resize: str, device: str,
                      batch_size: int) -> InceptionFeatures:
    return InceptionFeatures(path, resize, device, batch_size)


def inception_features(path: str | Path | None = None, resize: str = "clean", device=None,
                       batch_size: int = 32) -> InceptionFeatures:
    """An InceptionFeatures for the file at `path` or the standard locations (cached while the file is unchanged)."""
    p = find_inception_weights(path).resolve()
    dev = str(torch.device(device) if device is not None else
              torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    st = p.stat()
    return _cached_extractor(str(p), st.st_size, st.st_mtime_ns, check_resize(resize), dev, int(batch_size))
