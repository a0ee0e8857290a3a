"""A model's own sampler settings (meta) are what sampling, grids and FID use when a flag is left out."""

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.models.io import save_denoiser
from fewstep.sampling import generate, sampler_settings
from fewstep.teachers import load_teacher


def test_teacher_defaults_are_heun_50_uniform():
    s = sampler_settings(load_teacher("toy:checkerboard"))
    assert (s.steps, s.solver, s.renoise, s.guidance, s.spacing) == (50, "heun", "fresh", 1.0, "uniform")
    assert torch.allclose(s.timesteps, 1.0 - torch.arange(50, dtype=torch.float64) / 50)


def test_saved_time_list_is_used_when_its_length_matches():
    den = load_teacher("toy:checkerboard")
    den.meta.update({"default_solver": "fewstep", "default_steps": 3, "default_renoise": "deterministic",
                     "timesteps": {"3": [0.9, 0.6, 0.2]}, "default_spacing": "shifted"})
    s = sampler_settings(den)
    assert s.spacing == "saved" and s.timesteps.tolist() == [0.9, 0.6, 0.2]
    assert s.renoise == "deterministic" and s.solver == "fewstep"
    # another step count: the model's default spacing; an explicit spacing beats the saved list
    assert sampler_settings(den, steps=2).spacing == "shifted"
    assert sampler_settings(den, spacing="uniform").timesteps.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3])
    den.meta["timesteps"] = [0.8, 0.4, 0.1]  # a plain list is the list for its own length
    assert sampler_settings(den).timesteps.tolist() == [0.8, 0.4, 0.1]
    with pytest.raises(FewstepError, match="unknown spacing"):
        sampler_settings(den, steps=2, spacing="linear")


def test_fewstep_sample_uses_the_models_renoise_and_time_list(tmp_path):
    from fewstep import api

    den = load_teacher("toy:checkerboard")
    den.meta.update({"default_solver": "fewstep", "default_steps": 3, "default_renoise": "deterministic",
                     "timesteps": [0.9, 0.6, 0.2]})
    save_denoiser(den, tmp_path / "m")
    res = api.sample(str(tmp_path / "m"), num=64, seed=3)
    # deterministic re-noise on the saved list is the Euler (DDIM) path on that list
    ref, _ = generate(den, 64, timesteps=[0.9, 0.6, 0.2], solver="euler", seed=3)
    assert res["renoise"] == "deterministic" and res["spacing"] == "saved"
    assert torch.allclose(res["_samples"], ref, atol=1e-5)
    fresh = api.sample(str(tmp_path / "m"), num=64, seed=3, renoise="fresh")["_samples"]
    assert not torch.allclose(fresh, ref, atol=1e-3)
