"""Save and load Denoisers as a directory: model.safetensors (weights) + config.json (everything else)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fewstep.diffusion.processes import process_from_config
from fewstep.errors import FewstepError
from fewstep.fileio import atomic_write
from fewstep.models.denoiser import Denoiser
from fewstep.models.networks import build_network
from fewstep.models.weights import load_weights

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1


def save_denoiser(denoiser: Denoiser, directory: str | Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `directory`/model.safetensors and config.json, each atomically (temp file + rename).

    The config is written last, so a directory with a config always has complete weights.
    `weights` overrides the network's state dict (e.g. to save EMA weights).
    """
    from safetensors.torch import save_file

    if not hasattr(denoiser.net, "config"):
        raise FewstepError("only networks with a config() method (fewstep.models.MLPNet/UNetNet, diffusers nets) "
                           "can be saved")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = weights if weights is not None else denoiser.net.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(state, tmp))
    config = {"format_version": FORMAT_VERSION, "network": denoiser.net.config(), "denoiser": denoiser.config(),
              "meta": denoiser.meta}
    atomic_write(directory / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=1)))
    return directory


def read_config(directory: str | Path) -> dict:
    """The parsed config.json of a model directory, checked for the keys `load_denoiser` needs."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FewstepError(f"{str(path)!r} not found: a model directory holds {CONFIG} and {WEIGHTS}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FewstepError(f"cannot read {str(path)!r}: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("network"), dict) or not isinstance(
            cfg.get("denoiser"), dict) or "process" not in cfg["denoiser"] or "prediction" not in cfg["denoiser"]:
        raise FewstepError(f"{str(path)!r} is not a fewstep model config: it needs 'network' and 'denoiser' "
                           "(with 'process' and 'prediction') entries")
    version = cfg.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FewstepError(f"{str(path)!r} has format_version {version}; this fewstep reads up to "
                           f"{FORMAT_VERSION} (upgrade fewstep)")
    return cfg


def load_denoiser(directory: str | Path, device: str | torch.device = "cpu", *, dtype=None) -> Denoiser:
    """Rebuild a Denoiser saved by `save_denoiser` (safetensors only; no pickle). `dtype`: the precision a diffusers
    student's base pipeline is loaded in (None: as stored); built-in networks are cast by the caller."""
    directory = Path(directory)
    cfg = read_config(directory)
    if cfg["network"].get("type") == "diffusers":  # a student of a diffusers teacher: weights over its pipeline
        from fewstep.models.diffusers_pipeline import load_diffusers_denoiser

        return load_diffusers_denoiser(directory, cfg, device, dtype=dtype)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise FewstepError(f"{str(weights)!r} not found")
    net = build_network(cfg["network"])
    load_weights(net, weights, f"the network in {CONFIG}", device)
    d = cfg["denoiser"]
    try:
        den = Denoiser(
            net.to(device), process_from_config(d["process"]), d["prediction"], cond_kind=d.get("cond_kind", "none"),
            num_classes=d.get("num_classes"), sigma_d=d.get("sigma_d", 1.0), data_shape=d.get("data_shape"),
            meta=cfg.get("meta", {}), boundary=d.get("boundary"),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise FewstepError(f"bad denoiser entry in {str(directory / CONFIG)!r}: {e}") from None
    return den.eval()
