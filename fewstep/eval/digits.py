"""FD-digits: the Frechet distance in the feature space of a small digits classifier shipped with fewstep.

The classifier is a 3-layer CNN on 8x8 grey digits in [-1, 1] (16x16 inputs are average-pooled to
8x8 first; larger multiples of 8 are pooled likewise), trained on the 1497-image training split
with random one-pixel shifts (Adam 2e-3, cosine schedule, 40 epochs, batch 64, seed 0). Its 64-d
penultimate layer (before the ReLU) is the feature space. FD-digits is the Frechet distance
(`fewstep.eval.frechet`) between Gaussians fitted to the features of the samples and of a reference;
the default reference is all 1797 digits at the samples' resolution (bilinear upsampling as in
`fewstep.data.digits`), whose statistics are cached in memory.

The shipped weights (292 KB, test accuracy 0.9933 at 8x8) are reproduced bit for bit on CPU by
(about 2.5 minutes on two cores):

    python -m fewstep.eval.digits --train --out fewstep/assets/digits_classifier.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.errors import FewstepError
from fewstep.eval.frechet import feature_stats, frechet_distance

WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "digits_classifier.safetensors"
FEATURE_DIM = 64
NUM_REFERENCE = 1797  # the default reference: every digit in scikit-learn's set


class DigitsClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 2 * 2, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return self.fc1(h.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.features(x)))


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """(N, C, R, R) images in [-1, 1] -> (N, 1, 8, 8): grey, average-pooled to 8x8."""
    x = torch.as_tensor(images).float()
    if x.ndim != 4:
        raise FewstepError(f"digits metrics need images (N, C, H, W); got samples of shape {tuple(x.shape)}")
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[1] != 1:
        raise FewstepError(f"digits metrics need 1 or 3 channels, got {x.shape[1]}")
    h, w = x.shape[-2:]
    if h != w or h % 8:
        raise FewstepError(f"digits metrics need square images of side 8, 16, 24, ...; got {h}x{w}")
    return F.avg_pool2d(x, h // 8) if h != 8 else x


@lru_cache(maxsize=1)
def load_classifier() -> DigitsClassifier:
    from safetensors.torch import load_file

    if not WEIGHTS.is_file():
        raise FewstepError(f"digits classifier weights missing at {str(WEIGHTS)!r}; reproduce them with "
                           "`python -m fewstep.eval.digits --train --out fewstep/assets/digits_classifier.safetensors`")
    net = DigitsClassifier()
    net.load_state_dict(load_file(str(WEIGHTS)))
    return net.eval().requires_grad_(False)


@lru_cache(maxsize=1)
def classifier_sha256() -> str:
    """SHA-256 of the shipped weights file (recorded with every FD-digits score)."""
    return hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()


@torch.no_grad()
def digits_features(images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The classifier's 64-d features (float64, (N, 64)) of images in [-1, 1] (N, C, R, R)."""
    x = to_classifier_input(images)
    if x.shape[0] == 0:
        raise FewstepError("no images to score")
    net = load_classifier()
    return torch.cat([net.features(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]).double()


@torch.no_grad()
def digits_predict(images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Predicted class (N,) of images in [-1, 1] (N, C, R, R)."""
    x = to_classifier_input(images)
    net = load_classifier()
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([net(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])


@lru_cache(maxsize=4)
def reference_stats(resolution: int = 8):
    """(mu, sigma) of the features of all 1797 digits at `resolution` (cached; do not modify)."""
    from fewstep.data.digits import load_digits_tensors, resize_digits

    x, _ = load_digits_tensors("all", 8)
    return feature_stats(digits_features(resize_digits(x, resolution)))


def fd_digits(samples: torch.Tensor, ref: torch.Tensor | None = None) -> float:
    """Frechet distance between classifier features of `samples` and of `ref` images.

    The default reference is all 1797 digits at the samples' resolution (statistics cached).
    """
    x = to_classifier_input(samples)
    if x.shape[0] < 2:
        raise FewstepError(f"fd-digits needs at least 2 samples, got {x.shape[0]}")
    stats = feature_stats(digits_features(x))
    if ref is None:
        ref_stats = reference_stats(int(torch.as_tensor(samples).shape[-1]))
    else:
        r = to_classifier_input(ref)
        if r.shape[0] < 2:
            raise FewstepError(f"fd-digits needs at least 2 reference images, got {r.shape[0]}")
        ref_stats = feature_stats(digits_features(r))
    return frechet_distance(*stats, *ref_stats)


def class_coverage(samples: torch.Tensor, min_fraction: float = 0.02) -> dict:
    """Histogram of the classifier's predicted classes.

    Returns "per_class" (10 fractions), "min_fraction", "classes_covered" (classes predicted for at
    least `min_fraction` of the samples; default threshold 2%), "entropy" (natural log; a uniform
    histogram gives "max_entropy" = ln 10 = 2.303) and "max_entropy".
    """
    pred = digits_predict(samples)
    frac = (torch.bincount(pred, minlength=10).double() / max(1, pred.numel())).tolist()
    entropy = -sum(p * math.log(p) for p in frac if p > 0)
    return {
        "per_class": [round(p, 5) for p in frac],
        "min_fraction": round(min(frac), 5),
        "classes_covered": int(sum(p >= min_fraction for p in frac)),
        "entropy": round(entropy, 5),
        "max_entropy": round(math.log(10), 5),
    }


def label_accuracy(samples: torch.Tensor, labels: torch.Tensor) -> float:
    """How often the classifier agrees with the label a class-conditional sample was generated for."""
    pred = digits_predict(samples)
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.shape[0] != pred.shape[0]:
        raise FewstepError(f"{pred.shape[0]} samples but {labels.shape[0]} labels")
    return float((pred == labels).double().mean())


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel (pad with background -1, then crop)."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (n,), generator=g)
    dy = torch.randint(0, 3, (n,), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(n)])


def train_digits_classifier(out_path: str | Path, seed: int = 0, epochs: int = 40, batch_size: int = 64) -> dict:
    """Train the classifier on the training split and save it (safetensors); returns test accuracy."""
    from safetensors.torch import save_file

    from fewstep.data.digits import load_digits_tensors
    from fewstep.fileio import atomic_write

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = load_digits_tensors("train", 8)
    xt, yt = load_digits_tensors("test", 8)
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(net(_shift(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(xt).argmax(1) == yt).double().mean())
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(Path(out_path), lambda tmp: save_file(state, tmp))
    return {"test_accuracy": acc, "epochs": epochs, "seed": seed, "out": str(out_path)}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train the FD-digits classifier.")
    ap.add_argument("--train", action="store_true", required=True)
    ap.add_argument("--out", default=str(WEIGHTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=40)
    a = ap.parse_args(argv)
    print(train_digits_classifier(a.out, a.seed, a.epochs))


if __name__ == "__main__":
    main()
