"""Diffusion math: noise processes, prediction types, conversions and timesteps."""

from fewstep.diffusion.predictions import (
    PREDICTION_TYPES,
    convert_prediction,
    from_x0,
    prediction_coeffs,
    to_x0,
    to_x0_eps,
)
from fewstep.diffusion.processes import (
    EDM,
    NoiseProcess,
    RectifiedFlow,
    TrigFlow,
    VPDiscrete,
    as_time,
    betas_for_schedule,
    convert_state,
    convert_time,
    expand_like,
    process_from_config,
)
from fewstep.diffusion.timesteps import sample_timesteps, sampling_timesteps

__all__ = [
    "EDM", "NoiseProcess", "PREDICTION_TYPES", "RectifiedFlow", "TrigFlow", "VPDiscrete", "as_time",
    "betas_for_schedule", "convert_prediction", "convert_state", "convert_time", "expand_like", "from_x0",
    "prediction_coeffs", "process_from_config", "sample_timesteps", "sampling_timesteps", "to_x0", "to_x0_eps",
]
