"""FD-digits: the Frechet distance in the feature space of a small digits classifier shipped with fewstep.

The classifier is a 3-layer CNN on 8x8 grey digits in [-1, 1] (16x16 inputs are average-pooled to
8x8 first), trained on the 1497-image training split with random one-pixel shifts. Its 64-d
penultimate layer (before the ReLU) is the feature space; the default reference is all 1797 digits.
The shipped weights are reproduced by:

    python -m fewstep.eval.digits --train --out fewstep/assets/digits_classifier.safetensors
"""

from __future__ import annotations

import argparse
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


@torch.no_grad()
def digits_features(images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The classifier's 64-d features of images in [-1, 1] (N, C, R, R)."""
    x = to_classifier_input(images)
    net = load_classifier()
    return torch.cat([net.features(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]).double()


@torch.no_grad()
def digits_predict(images: torch.Tensor) -> torch.Tensor:
    x = to_classifier_input(images)
    return load_classifier()(x).argmax(1)


@lru_cache(maxsize=2)
def reference_stats(resolution: int = 8):
    from fewstep.data.digits import load_digits_tensors

    x, _ = load_digits_tensors("all", resolution)
    return feature_stats(digits_features(x).numpy())


def fd_digits(samples: torch.Tensor, ref: torch.Tensor | None = None) -> float:
    """Frechet distance between classifier features of `samples` and of `ref` (default: all 1797 digits)."""
    f = digits_features(samples).numpy()
    if f.shape[0] < 2:
        raise FewstepError("fd-digits needs at least 2 samples")
    ref_stats = reference_stats(8) if ref is None else feature_stats(digits_features(ref).numpy())
    return frechet_distance(*feature_stats(f), *ref_stats)


def class_coverage(samples: torch.Tensor, min_fraction: float = 0.02) -> dict:
    """Histogram of predicted classes: fractions, the smallest one, classes holding >= min_fraction, entropy."""
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
    return float((digits_predict(samples) == torch.as_tensor(labels)).double().mean())


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
