"""The shared sampler engine for teachers and students (see solvers.py for the conventions)."""

from fewstep.sampling.generate import generate
from fewstep.sampling.seeds import noise_for_seeds, sample_seeds
from fewstep.sampling.solvers import (
    ODE_SOLVERS,
    RENOISE,
    SOLVERS,
    Trajectory,
    check_solver,
    flow_time,
    sample,
    sample_fewstep,
)

__all__ = [
    "ODE_SOLVERS", "RENOISE", "SOLVERS", "Trajectory", "check_solver", "flow_time", "generate", "noise_for_seeds",
    "sample", "sample_fewstep", "sample_seeds",
]
