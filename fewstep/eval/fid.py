"""FID (and KID, precision/recall) in Inception pool3 features, streamed from images, sample files or models.

FID = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}) (Heusel et al. 2017), computed by the one
`fewstep.eval.frechet.frechet_distance` that FD-digits uses too. Features are accumulated batch by
batch as float64 running sums (of f - c and of their outer products, for a shift c taken from the
first batch), so N samples never sit in memory as images; the (N, 2048) features themselves are kept
only when KID or precision/recall is asked for.

Samples come from `fewstep.eval.sources` (an image folder, a samples .npz, or a model sampled on the fly).

Reference statistics files (`save_reference_stats`) hold mu, sigma, n, optionally the features,
and the protocol (Inception weights sha256, resize mode, image sizes, N); a reference is refused when
its protocol differs from the current run's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fewstep.devices import resolve_device
from fewstep.errors import FewstepError
from fewstep.eval.frechet import frechet_distance
from fewstep.eval.inception import FEATURE_DIM, InceptionFeatures, check_resize, inception_features, to_uint8_images
from fewstep.eval.sources import looks_like_model_dir, open_samples

__all__ = ["FeatureAccumulator", "compute_fid", "extract_features", "frechet_distance", "load_reference_stats",
           "reference_stats", "save_reference_stats"]

STATS_FORMAT = "fewstep-inception-stats/1"
PROTOCOL_KEYS = ("weights_sha256", "resize", "feature_dim")  # must agree between samples and a stats reference

Progress = Callable[[str, int, "int | None"], None]  # (stage, samples just done, total or None)


# -- running statistics --------------------------------------------------------------------------------
class FeatureAccumulator:
    """Running mean and unbiased covariance of feature batches in float64; optionally keeps the features.

    Sums are of (f - c) with c the first batch's mean, so the covariance does not lose precision
    when the mean is large compared with the spread.
    """

    def __init__(self, keep_features: bool = False):
        self.keep_features = keep_features
        self.n = 0
        self._shift = self._sum = self._outer = None
        self._kept: list[torch.Tensor] = []
        self._small: list[torch.Tensor] | None = []  # float64 features while n <= dim (low-rank Frechet route)

    def add(self, features) -> None:
        f = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
        f = f.detach().double().cpu()
        if f.ndim != 2:
            raise FewstepError(f"features must be (N, D), got shape {tuple(f.shape)}")
        if f.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = f.mean(0)
            d = f.shape[1]
            self._sum = torch.zeros(d, dtype=torch.float64)
            self._outer = torch.zeros(d, d, dtype=torch.float64)
        elif f.shape[1] != self._shift.shape[0]:
            raise FewstepError(f"feature dimension changed from {self._shift.shape[0]} to {f.shape[1]}")
        g = f - self._shift
        self._sum += g.sum(0)
        self._outer += g.T @ g
        self.n += f.shape[0]
        if self.keep_features:
            self._kept.append(f.float())
        if self._small is not None:
            self._small.append(f)
            if self.n > f.shape[1]:
                self._small = None

    @property
    def dim(self) -> int | None:
        return None if self._shift is None else int(self._shift.shape[0])

    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise FewstepError("no features were accumulated")
        return (self._shift + self._sum / self.n).numpy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance sum (g - gbar)(g - gbar)^T / (n - 1)."""
        if self.n < 2:
            raise FewstepError(f"need at least 2 samples for a covariance, got {self.n}")
        gbar = self._sum / self.n
        c = (self._outer - self.n * torch.outer(gbar, gbar)) / (self.n - 1)
        return ((c + c.T) / 2).numpy()

    def covariance_factor(self) -> np.ndarray | None:
        """G = (F - mean) / sqrt(n - 1) with cov = G^T G, while n <= dim (else None)."""
        if self._small is None or self.n < 2:
            return None
        f = torch.cat(self._small)
        return ((f - f.mean(0)) / (self.n - 1) ** 0.5).numpy()

    def features(self) -> torch.Tensor | None:
        if not self.keep_features:
            return None
        return torch.cat(self._kept) if self._kept else torch.zeros(0, self.dim or 0)


# -- extraction ----------------------------------------------------------------------------------------
class _ImageWriter:
    """PNG files written into a hidden staging folder, renamed to `out` when everything is written."""

    def __init__(self, out: str | Path, total: int):
        from fewstep.outputs import ensure_new_path

        self.out = ensure_new_path(out, "--save-images")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.", suffix=".tmp"))
        self.width = max(5, len(str(max(total - 1, 0))))
        self.count = 0

    def write(self, images) -> None:
        from PIL import Image

        items = images if isinstance(images, list) else list(images)
        for img in items:
            a = to_uint8_images(img[None])[0].permute(1, 2, 0).numpy()
            name = self.staging / f"{self.count:0{self.width}d}.png"
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(name)
            self.count += 1

    def finish(self) -> str:
        if self.out.exists():
            self.out.rmdir()  # empty, checked when opened
        os.replace(self.staging, self.out)
        return str(self.out)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def extract_features(source, extractor: InceptionFeatures, *, keep_features: bool = False,
                     progress: Progress | None = None, stage: str = "samples",
                     save_images: str | Path | None = None) -> tuple[FeatureAccumulator, dict]:
    """Feed every batch of `source` through `extractor` into a FeatureAccumulator.

    Returns the accumulator and {"image_shapes": sorted distinct (C, H, W), "saved_images": dir or None}.
    """
    acc = FeatureAccumulator(keep_features)
    shapes: set[tuple] = set()
    writer = _ImageWriter(save_images, source.total) if save_images is not None else None
    try:
        for batch in source.batches():
            items = batch if isinstance(batch, list) else [batch]
            for item in items:
                imgs = item if item.ndim == 4 else item[None]
                shapes.add(tuple(int(s) for s in imgs.shape[1:]))
                acc.add(extractor(imgs))
            if writer is not None:
                writer.write(batch)
            if progress is not None:
                progress(stage, sum(int(i.shape[0]) if i.ndim == 4 else 1 for i in items), source.total)
        saved = writer.finish() if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if acc.n < 2:
        raise FewstepError(f"need at least 2 images for feature statistics, got {acc.n}")
    return acc, {"image_shapes": sorted(shapes), "saved_images": saved}


def _shape_label(shapes: list[tuple]) -> str:
    if len(shapes) == 1:
        c, h, w = shapes[0]
        return f"{h}x{w}x{c}"
    return "mixed"


# -- reference statistics files ------------------------------------------------------------------------
def save_reference_stats(out: str | Path, acc: FeatureAccumulator, protocol: dict, *,
                         include_features: bool = False) -> Path:
    """Write mu, sigma, n, the protocol (JSON) and optionally the float32 features to a new .npz."""
    from fewstep.fileio import atomic_write
    from fewstep.outputs import ensure_new_path

    out = ensure_new_path(out, "--out")
    if out.suffix != ".npz":
        raise FewstepError(f"reference statistics are written as .npz; got --out {str(out)!r}")
    arrays = {"mu": acc.mean(), "sigma": acc.cov(), "n": np.array(acc.n, dtype=np.int64),
              "format": np.array(STATS_FORMAT), "protocol": np.array(json.dumps(protocol, sort_keys=True))}
    if include_features:
        arrays["features"] = acc.features().numpy().astype(np.float32)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(out, write)
    return out


def is_stats_file(path: str | Path) -> bool:
    p = Path(path)
    if not (p.is_file() and p.suffix == ".npz"):
        return False
    try:
        with np.load(p, allow_pickle=False) as z:
            return "mu" in z.files and "sigma" in z.files
    except (OSError, ValueError):
        return False


def load_reference_stats(path: str | Path) -> dict:
    """{"mu", "sigma", "n", "protocol", "features" (or None)} from a stats .npz (no pickles)."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise FewstepError(f"{str(p)!r} is not a reference statistics file (no mu/sigma arrays)")
            mu, sigma = np.array(z["mu"], dtype=np.float64), np.array(z["sigma"], dtype=np.float64)
            protocol = json.loads(str(z["protocol"])) if "protocol" in z.files else None
            n = int(z["n"]) if "n" in z.files else None
            feats = np.array(z["features"], dtype=np.float32) if "features" in z.files else None
    except (OSError, ValueError) as e:
        raise FewstepError(f"cannot read reference statistics {str(p)!r}: {e}") from None
    if protocol is None:
        raise FewstepError(f"{str(p)!r} records no protocol (weights hash, resize); recompute it with "
                           "`fewstep eval stats` so FID is computed the same way on both sides")
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise FewstepError(f"{str(p)!r} holds statistics of shape mu {mu.shape}, sigma {sigma.shape}; expected "
                           f"{FEATURE_DIM}-d Inception statistics")
    return {"mu": mu, "sigma": sigma, "n": n, "protocol": protocol,
            "features": torch.from_numpy(feats) if feats is not None else None}


def check_protocol(ref_protocol: dict, protocol: dict, ref_name: str) -> None:
    """Refuse a reference computed with other Inception weights, resize mode or feature size (one line)."""
    for key in PROTOCOL_KEYS:
        if ref_protocol.get(key) != protocol.get(key):
            mine, theirs = protocol.get(key), ref_protocol.get(key)
            if key == "weights_sha256":
                mine, theirs = str(mine)[:12], str(theirs)[:12]
            raise FewstepError(f"reference {ref_name!r} was computed with {key}={theirs}, this run uses {key}={mine}; "
                               "statistics from different protocols are not comparable (recompute the reference "
                               "with `fewstep eval stats`)")


# -- the library calls ---------------------------------------------------------------------------------
def reference_stats(images, out: str | Path, *, inception: str | Path | None = None, resize: str = "clean",
                    batch_size: int = 64, save_features: bool = False, device=None,
                    progress: Progress | None = None) -> dict:
    """Compute Inception statistics of an image folder or samples .npz once and write them to `out` (.npz)."""
    from fewstep.outputs import ensure_new_path

    ensure_new_path(out, "--out")
    if Path(str(out)).suffix != ".npz":
        raise FewstepError(f"reference statistics are written as .npz; got --out {str(out)!r}")
    check_resize(resize)
    device = resolve_device(device)
    path = Path(str(images))
    if not path.exists():
        raise FewstepError(f"--images {str(images)!r} does not exist (give an image folder or a samples .npz)")
    if path.is_dir() and looks_like_model_dir(path):
        raise FewstepError(f"--images {str(images)!r} is a model directory; give an image folder or a samples .npz")
    if is_stats_file(path):
        raise FewstepError(f"--images {str(images)!r} is already a statistics file")
    source = open_samples(path, batch_size=batch_size)
    extractor = inception_features(inception, resize, device, batch_size)
    acc, info = extract_features(source, extractor, keep_features=save_features, progress=progress, stage="images")
    protocol = {**extractor.protocol, "n": acc.n, "image_size": _shape_label(info["image_shapes"]),
                "source": source.describe()}
    save_reference_stats(out, acc, protocol, include_features=save_features)
    return {"out": str(out), "n": acc.n, "includes_features": bool(save_features), "protocol": protocol}


def _reference_side(ref, extractor: InceptionFeatures, protocol: dict, need_features: bool, batch_size: int,
                    progress: Progress | None) -> dict:
    path = Path(str(ref))
    if not path.exists():
        raise FewstepError(f"--ref {str(ref)!r} does not exist (give an image folder, a samples .npz or a stats .npz "
                           "from `fewstep eval stats`)")
    if is_stats_file(path):
        st = load_reference_stats(path)
        check_protocol(st["protocol"], protocol, str(ref))
        if need_features and st["features"] is None:
            raise FewstepError(f"KID and precision/recall need the reference features; {str(ref)!r} has only "
                               "mu and sigma (recompute it with `fewstep eval stats --save-features`)")
        return {"mu": st["mu"], "sigma": st["sigma"], "n": st["n"], "features": st["features"], "factor": None,
                "describe": {"kind": "stats", "path": str(path), "num": st["n"],
                             "image_size": st["protocol"].get("image_size")}}
    if path.is_dir() and looks_like_model_dir(path):
        raise FewstepError(f"--ref {str(ref)!r} is a model directory; give an image folder, a samples .npz or a "
                           "stats .npz")
    source = open_samples(path, batch_size=batch_size)
    acc, info = extract_features(source, extractor, keep_features=need_features, progress=progress, stage="reference")
    return {"mu": acc.mean(), "sigma": acc.cov(), "n": acc.n, "features": acc.features(),
            "factor": acc.covariance_factor(),
            "describe": {**source.describe(), "image_size": _shape_label(info["image_shapes"])}}


def compute_fid(samples, ref, *, inception: str | Path | None = None, resize: str = "clean", num: int | None = None,
                steps: int | None = None, solver: str | None = None, seed: int = 0, batch_size: int = 64,
                guidance: float | None = None, kid: bool = False, pr: bool = False, kid_subsets: int = 100,
                kid_subset_size: int = 1000, pr_k: int = 3, save_images: str | Path | None = None, device=None,
                dtype=None, progress: Progress | None = None) -> dict:
    """FID of `samples` (image folder, samples .npz, or model sampled `num` times) against `ref`
    (image folder, samples .npz, or a stats .npz with the same protocol); optionally KID and
    precision/recall from the same features. Returns a JSON-able result with the full protocol.
    """
    from fewstep.eval.prdc import kid as kid_fn
    from fewstep.eval.prdc import precision_recall

    check_resize(resize)
    if batch_size < 1:
        raise FewstepError(f"--batch-size must be >= 1, got {batch_size}")
    device = resolve_device(device)
    ref_path = Path(str(ref))
    if not ref_path.exists():
        raise FewstepError(f"--ref {str(ref)!r} does not exist (give an image folder, a samples .npz or a stats .npz "
                           "from `fewstep eval stats`)")
    if is_stats_file(samples):
        raise FewstepError(f"--samples {str(samples)!r} is a statistics file; give images, a samples .npz or a model")
    if save_images is not None:
        from fewstep.outputs import ensure_new_path

        ensure_new_path(save_images, "--save-images")
    source = open_samples(samples, num=num, steps=steps, solver=solver, seed=seed, batch_size=batch_size,
                          guidance=guidance, device=device, dtype=dtype)
    if save_images is not None and source.kind != "model":
        raise FewstepError("--save-images applies when sampling a model; these samples are files already")
    extractor = inception_features(inception, resize, device, batch_size)
    protocol = extractor.protocol
    need_features = kid or pr
    # the reference first: a mismatched stats file is refused before any sampling
    ref_side = _reference_side(ref, extractor, protocol, need_features, batch_size, progress)
    n_samples = num if source.kind == "model" else None
    if pr and (ref_side["n"] <= pr_k or (n_samples is not None and n_samples <= pr_k)):
        # checked before sampling, so a refused run leaves no --save-images behind
        raise FewstepError(f"--pr needs more than k={pr_k} samples on each side (samples: {n_samples}, "
                           f"reference: {ref_side['n']})")
    acc, info = extract_features(source, extractor, keep_features=need_features, progress=progress,
                                 stage="samples", save_images=save_images)
    value = frechet_distance(acc.mean(), acc.cov(), ref_side["mu"], ref_side["sigma"],
                             factor1=acc.covariance_factor(), factor2=ref_side["factor"])
    result = {
        "metric": "fid",
        "value": float(value),
        "fid": float(value),
        "lower_is_better": True,
        "n_samples": acc.n,
        "n_ref": ref_side["n"],
        "samples": source.describe(),
        "ref": ref_side["describe"],
        "seed": int(seed),
        "protocol": {**protocol, "image_size": _shape_label(info["image_shapes"]),
                     "frechet": "float64; Tr sqrt(S1 S2) from symmetric eigendecompositions (of sqrt(S1) S2 "
                                "sqrt(S1), or G S2 G^T when S1 = G^T G has rank < 2048)",
                     "covariance": "unbiased (N - 1)"},
    }
    if info["saved_images"] is not None:
        result["saved_images"] = info["saved_images"]
    if kid:
        k = kid_fn(acc.features(), ref_side["features"], subsets=kid_subsets, subset_size=kid_subset_size, seed=seed,
                   device=device)
        result["kid"] = k["value"]
        result["kid_std"] = k["std"]
        result["protocol"]["kid"] = {"kernel": "(x.y / d + 1)^3", "estimator": "unbiased MMD^2",
                                     "subsets": k["subsets"], "subset_size": k["subset_size"], "seed": int(seed)}
    if pr:
        p = precision_recall(ref_side["features"], acc.features(), k=pr_k, device=device)
        result["precision"], result["recall"] = p["precision"], p["recall"]
        result["protocol"]["precision_recall"] = {"method": "k-NN manifolds (Kynkaanniemi et al. 2019)", "k": p["k"],
                                                  "distance": "Euclidean in pool3 features"}
    return result
