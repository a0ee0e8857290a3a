"""The one few-step rollout: the student sampler, DMD2's backward simulation and TDM's trajectory walk it.

Checked against the path written out by hand (x0 = D(x_i, t_i), x_{i+1} = alpha x0 + sigma z), per-sample times
against the same path run sample by sample, `stop` against a full rollout, and the model calls it makes."""

from __future__ import annotations

import pytest
import torch

from fewstep.diffusion import RectifiedFlow, VPDiscrete
from fewstep.sampling.rollout import rollout

F64 = torch.float64


def toy_model(x, t, rows):
    """A smooth x0 prediction that depends on the state and the time (float64)."""
    t = torch.as_tensor(t, dtype=F64).reshape(-1, 1) if torch.as_tensor(t).ndim else torch.as_tensor(t, dtype=F64)
    return torch.tanh(x * (1.0 + t)) * 0.8 - 0.1 * t


def by_hand(process, x, times, renoise, zs=None):
    """The path written out for shared times: returns the states and the final x0."""
    states = [x]
    for i, t in enumerate(times):
        x0 = toy_model(x, t, None)
        if i == len(times) - 1:
            return states, x0
        a, s = float(process.alpha(t)), float(process.sigma(t))
        z = zs[i] if renoise == "fresh" else (x - a * x0) / s
        t_next = times[i + 1]
        x = float(process.alpha(t_next)) * x0 + float(process.sigma(t_next)) * z
        states.append(x)


@pytest.mark.parametrize("process, times", [
    (RectifiedFlow(), [1.0, 0.75, 0.5, 0.25]),
    (VPDiscrete.from_schedule("scaled_linear"), [999.0, 749.0, 499.0, 249.0]),
], ids=["flow", "vp"])
@pytest.mark.parametrize("renoise", ["fresh", "deterministic"])
def test_full_path_matches_the_path_written_out(process, times, renoise):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=F64)
    zs = [torch.randn(5, 3, generator=g, dtype=F64) for _ in times]
    ts = torch.tensor(times, dtype=F64)
    drawn = []

    def fresh(i, xi, rows):
        drawn.append(i)
        return zs[i]

    out = rollout(process, toy_model, x, ts, renoise=renoise, fresh=fresh, capture=True)
    states, x0_last = by_hand(process, x, ts, renoise, zs)
    torch.testing.assert_close(out.x, x0_last, rtol=0, atol=0)
    assert len(out.xs) == len(times) + 1 and len(out.x0s) == len(times)
    for a, b in zip(out.xs[:-1], states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # fresh noise is drawn once per step into a noisy time, never for the landing on clean data
    assert drawn == (list(range(len(times) - 1)) if renoise == "fresh" else [])


def test_steps_stops_everyone_early_without_landing():
    proc, ts = RectifiedFlow(), torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=F64)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    part = rollout(proc, toy_model, x, ts, renoise="deterministic", steps=2, capture=True)
    full = rollout(proc, toy_model, x, ts, renoise="deterministic", capture=True)
    assert len(part.xs) == 3
    torch.testing.assert_close(part.x, full.xs[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="at most 4 steps"):
        rollout(proc, toy_model, x, ts, renoise="deterministic", steps=5)


def test_per_sample_times_and_stops_equal_each_sample_run_alone():
    """Each sample on its own grid, stopped at its own step: the same as a shared-time rollout of that sample
    alone, and the model is only called on the samples still moving."""
    proc = RectifiedFlow()
    grids = torch.tensor([[1.0, 0.75, 0.5, 0.25, 0.0], [1.0, 0.5, 0.0, 0.0, 0.0], [1.0, 2 / 3, 1 / 3, 0.0, 0.0],
                          [1.0, 0.75, 0.5, 0.25, 0.0]], dtype=F64)
    stop = torch.tensor([3, 1, 0, 2])
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    calls = []

    def model(xi, t, rows):
        calls.append(rows.tolist())
        return toy_model(xi, t, rows)

    x_before = x.clone()
    out = rollout(proc, model, x, grids, renoise="deterministic", stop=stop)
    assert calls == [[0, 1, 3], [0, 3], [0]]
    torch.testing.assert_close(out.x[2], x[2], rtol=0, atol=0)  # a sample stopped at step 0 does not move
    for b in range(4):
        k = int(stop[b])
        alone = rollout(proc, toy_model, x[b:b + 1], grids[b, :k + 1], renoise="deterministic", steps=k).x
        torch.testing.assert_close(out.x[b:b + 1], alone, rtol=1e-6, atol=1e-6)
    assert not torch.equal(out.x, x) and torch.equal(x, x_before)  # the input is left alone
    with pytest.raises(ValueError, match="use steps, not stop"):
        rollout(proc, model, x, grids, renoise="deterministic", stop=stop, capture=True)


def test_half_precision_states_are_scaled_by_python_floats():
    """Shared times give Python-float coefficients, so a bf16 state is scaled as by a scalar (computed in fp32)."""
    proc, ts = RectifiedFlow(), torch.tensor([1.0, 0.6], dtype=F64)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)

    def model(xi, t, rows):
        return (xi.float() * 0.5).to(xi.dtype)

    out = rollout(proc, model, x, ts, renoise="deterministic", steps=1).x
    x0 = (x.float() * 0.5).to(torch.bfloat16)
    z = (x - 0.0 * x0) / 1.0
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, 0.4 * x0 + 0.6 * z, rtol=0, atol=0)


def _col(v, like):
    return v.float().to(like.device).reshape((-1,) + (1,) * (like.ndim - 1))


def test_tdm_trajectory_is_bit_identical_to_its_own_former_loop():
    """TDM's former loop (per-sample grids, in-place moves of the samples still ahead, float32 coefficient
    columns), written out here: the shared rollout gives the same bits (float32 states, a VP process)."""
    proc = VPDiscrete.from_schedule("scaled_linear")
    g = torch.Generator().manual_seed(4)
    grids = torch.tensor([[999.0, 749.0, 499.0, 249.0, 0.0], [999.0, 499.0, 0.0, 0.0, 0.0],
                          [999.0, 665.0, 332.0, 0.0, 0.0]] * 3, dtype=F64)
    k = torch.tensor([3, 1, 0, 2, 0, 1, 1, 1, 2])
    noise = torch.randn(9, 3, generator=g)

    def model(x, t, rows):
        return torch.tanh(x * (1.0 + t.float()[:, None] / 1000.0)) * 0.8

    x = noise.clone()
    for j in range(int(k.max())):
        sel = torch.nonzero(k > j).squeeze(1)
        t, t_next = grids[sel, j], grids[sel, j + 1]
        xs = x[sel]
        x0 = model(xs, t, sel).float()
        eps = (xs - _col(proc.alpha(t), xs) * x0) / _col(proc.sigma(t).clamp_min(1e-12), xs)
        x[sel] = (_col(proc.alpha(t_next), xs) * x0 + _col(proc.sigma(t_next), xs) * eps).to(x.dtype)
    out = rollout(proc, lambda xi, t, rows: model(xi, t, rows).float(), noise, grids, renoise="deterministic",
                  stop=k).x
    assert torch.equal(out, x)


def test_dmd2_backward_simulation_is_bit_identical_to_its_own_former_loop():
    """DMD2's former rollout (every sample every step, scalar coefficients per step, fresh noise drawn for the
    whole batch in turn), written out here: the same states bit for bit."""
    proc = VPDiscrete.from_schedule("scaled_linear")
    times = torch.tensor([999.0, 749.0, 499.0, 249.0], dtype=F64)
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(5))

    def model(x, t):
        return torch.tanh(x * (1.0 + float(t) / 1000.0)) * 0.8

    g = torch.Generator().manual_seed(6)
    states, x = [noise], noise
    for i in range(3):
        x0 = model(x, times[i]).float()
        z = torch.randn(noise.shape, generator=g)
        x = float(proc.alpha(times[i + 1])) * x0 + float(proc.sigma(times[i + 1])) * z
        states.append(x)
    g2 = torch.Generator().manual_seed(6)
    path = rollout(proc, lambda xi, t, rows: model(xi, t).float(), noise, times, renoise="fresh",
                   fresh=lambda i, xi, rows: torch.randn(noise.shape, generator=g2), steps=3, capture=True)
    assert len(path.xs) == 4 and all(torch.equal(a, b) for a, b in zip(path.xs, states, strict=True))
