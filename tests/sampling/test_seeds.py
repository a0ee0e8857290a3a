"""Per-sample seeds: a sample's noise depends on its seed only, never on its batch."""

from __future__ import annotations

import torch

from fewstep.sampling import noise_for_seeds, renoise_for_seeds, sample_seeds, step_seed


def test_sample_seeds_are_positional_and_distinct():
    assert sample_seeds(3, 0, 5)[2:] == sample_seeds(3, 2, 3)
    assert sample_seeds(0, 0, 3) == [0, 1, 2]
    assert len(set(sample_seeds(7, 0, 1000)) | set(sample_seeds(8, 0, 1000))) == 2000
    assert sample_seeds(1, 0, 0) == []


def test_noise_rows_depend_only_on_their_seed():
    seeds = sample_seeds(5, 0, 6)
    full = noise_for_seeds(seeds, (3, 4, 4))
    assert full.shape == (6, 3, 4, 4) and full.dtype == torch.float32
    torch.testing.assert_close(noise_for_seeds(seeds[4:], (3, 4, 4)), full[4:])
    torch.testing.assert_close(noise_for_seeds(seeds[::-1], (3, 4, 4)), full.flip(0))
    # the same numbers in any dtype (drawn in float32, then cast)
    torch.testing.assert_close(noise_for_seeds(seeds, (3, 4, 4), dtype=torch.float64), full.double())
    assert noise_for_seeds([], (2,)).shape == (0, 2)
    # rows are different draws and look like unit Gaussians
    assert not torch.allclose(full[0], full[1])
    big = noise_for_seeds(sample_seeds(0, 0, 64), (256,))
    assert abs(float(big.mean())) < 0.05 and abs(float(big.std()) - 1) < 0.05


def test_renoise_streams_are_independent_of_the_initial_noise_and_of_each_other():
    seeds = sample_seeds(0, 0, 4)
    init = noise_for_seeds(seeds, (8,))
    r1, r2 = renoise_for_seeds(seeds, 1, (8,)), renoise_for_seeds(seeds, 2, (8,))
    for a, b in ((init, r1), (init, r2), (r1, r2)):
        assert not torch.allclose(a, b)
    torch.testing.assert_close(renoise_for_seeds(seeds[1:3], 2, (8,)), r2[1:3])
    # step seeds do not collide with nearby sample seeds (a seed-offset stream would)
    assert len({step_seed(s, k) for s in range(100) for k in range(1, 5)} | set(range(100))) == 500
