"""Reading safetensors weights into a network, with one-line errors (no pickle). Below `io.py` and the diffusers
adapters, which both load weights this way."""

from __future__ import annotations

from pathlib import Path

import torch

from fewstep.errors import FewstepError


def load_weights(net: torch.nn.Module, weights: Path, what: str, device: str | torch.device = "cpu") -> None:
    """Load a safetensors file into `net` (strict; no pickle): unreadable weights, or weights that do not fit
    `what` (e.g. "the student network"), are one-line errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:
        raise FewstepError(f"cannot read weights {str(weights)!r}: {e}") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise FewstepError(f"weights in {str(weights)!r} do not match {what}: {str(e).splitlines()[0]}") from None
