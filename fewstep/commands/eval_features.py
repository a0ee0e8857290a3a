"""`fewstep eval fid|stats|clip`: feature-space metrics (Inception FID, KID, precision/recall, CLIP score).

cli.py calls `register(eval_app)`; helpers from `fewstep.cli` are imported inside the commands so
this module can be imported by cli.py without a cycle.
"""

from __future__ import annotations


def register(eval_app) -> None:
    """Add the feature-space eval commands to the `fewstep eval` Typer app."""
