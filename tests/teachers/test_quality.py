"""The shipped teachers are good enough to distil from: measured with the shared sampler and metrics."""

import pytest

from fewstep.data import REFERENCE_SEED, get_data
from fewstep.eval import sliced_wasserstein
from fewstep.sampling import generate
from fewstep.teachers import load_teacher

N = 4096


def swd_ratio(name: str) -> tuple[float, float]:
    """(SWD(teacher samples, held-out), SWD(held-out, other held-out)) at N points each."""
    den = load_teacher(name)
    src = get_data(name)
    ref, _ = src.reference(N, seed=REFERENCE_SEED)
    other, _ = src.reference(N, seed=REFERENCE_SEED + 1)
    x, _ = generate(den, N, steps=50, solver="heun", seed=0, batch_size=N)
    return sliced_wasserstein(x, ref), sliced_wasserstein(other, ref)


@pytest.mark.parametrize("name", ["toy:checkerboard", "toy:gaussians8", "toy:moons", "toy:spirals"])
def test_toy_teacher_within_2x_of_held_out_floor(name):
    """50 Heun steps (about 2 s per teacher on two cores)."""
    swd, floor = swd_ratio(name)
    assert swd < 2 * floor, (swd, floor)


@pytest.mark.slow
def test_digits_teacher_fd_and_accuracy():
    from fewstep.eval import fd_digits, label_accuracy

    den = load_teacher("digits")
    x, labels = generate(den, 1000, steps=50, solver="heun", seed=0)
    assert fd_digits(x) < 4.0  # 1.99 when shipped
    assert label_accuracy(x, labels) > 0.97  # 0.993 when shipped
    x, labels = generate(den, 200, steps=50, solver="heun", seed=1, guidance=2.0)
    assert label_accuracy(x, labels) > 0.99
