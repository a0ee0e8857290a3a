"""The shared sampler engine for teachers and students (see solvers.py for the conventions)."""

from fewstep.sampling.defaults import SamplerSettings, sampler_settings
from fewstep.sampling.generation import generate
from fewstep.sampling.seeds import noise_for_seeds, renoise_for_seeds, sample_seeds, step_seed
from fewstep.sampling.solvers import (
    ODE_SOLVERS,
    RENOISE,
    SOLVERS,
    Trajectory,
    check_renoise,
    check_solver,
    flow_scale,
    flow_time,
    ode_solve,
    resolve_timesteps,
    sample,
    sample_fewstep,
)

__all__ = [
    "ODE_SOLVERS", "RENOISE", "SOLVERS", "SamplerSettings", "Trajectory", "check_renoise", "check_solver",
    "flow_scale", "flow_time", "generate", "noise_for_seeds", "ode_solve", "renoise_for_seeds", "resolve_timesteps",
    "sample", "sample_fewstep", "sample_seeds", "sampler_settings", "step_seed",
]
