"""CD / LCM: registry, boundary condition, targets from the teacher step, guidance input."""

import pytest
import torch

from fewstep.diffusion import VPDiscrete
from fewstep.errors import FewstepError
from fewstep.methods import Batch, StepContext, available_methods, build_method_config, get_method
from fewstep.models import Denoiser
from fewstep.models.denoiser import boundary_scalings
from fewstep.models.mlp import MLPNet
from fewstep.sampling import ode_solve
from fewstep.teachers import load_teacher


def test_registry_and_options():
    assert {"cd", "lcm"} <= set(available_methods())
    assert build_method_config("lcm", {}).skip == 20
    with pytest.raises(FewstepError, match="unknown option"):
        build_method_config("cd", {"nope": 1})
    with pytest.raises(FewstepError, match="unknown method"):
        get_method("nope")


def test_lcm_boundary_is_exact_at_clean_data_and_vanishes_at_noise():
    proc = VPDiscrete.from_schedule("scaled_linear")
    b = {"type": "lcm", "sigma_data": 0.5, "time_scale": 10.0}
    c_skip, c_out = boundary_scalings(proc, torch.tensor([0.0, 999.0], dtype=torch.float64), b)
    # timestep 0 of a VP schedule is almost clean: c_skip ~ 1 there; at 999 the network output is used
    assert c_skip[1] < 1e-6 and c_out[1] > 0.999
    # flow time 0 is exactly clean: f(x, 0) = x whatever the network says
    from fewstep.diffusion import RectifiedFlow

    c_skip0, c_out0 = boundary_scalings(RectifiedFlow(), torch.tensor([0.0]), b)
    assert float(c_skip0) == 1.0 and float(c_out0) == 0.0
    net = MLPNet(dim=2, width=16, depth=1)
    den = Denoiser(net, RectifiedFlow(), "flow", data_shape=(2,), boundary=b)
    x = torch.randn(4, 2)
    assert torch.allclose(den(x, torch.zeros(4)), x)


def test_flow_student_has_the_boundary_condition_without_extra_scalings():
    teacher = load_teacher("toy:checkerboard")
    method = get_method("cd")(teacher)
    student = method.networks()["student"].module
    assert student.boundary is None
    x = torch.randn(8, 2)
    with torch.no_grad():
        assert torch.allclose(student(x, torch.zeros(8)), x, atol=1e-6)


def _ctx(seed=0):
    return StepContext(iteration=0, generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"))


def test_cd_target_is_the_target_network_after_one_teacher_step():
    teacher = load_teacher("toy:checkerboard").requires_grad_(False)
    method = get_method("cd")(teacher, build_method_config("cd", {"num_timesteps": 4, "skip": 1}))
    roles = method.networks()
    nets = {k: r.module for k, r in roles.items()}
    x_hi = torch.randn(6, 2)
    grid = method.grid
    j = torch.tensor([0, 1, 2, 3, 0, 3])
    clean = (j + 1) >= 4
    t_hi, t_lo = grid[j], grid[(j + 1).clamp(max=3)]
    with torch.no_grad():
        x_lo, target = method._target(nets, x_hi, t_hi, t_lo, clean, None, 1.0, 1.0)
        for i in range(6):
            if clean[i]:
                exp_lo = teacher(x_hi[i:i + 1], t_hi[i:i + 1].float())
                assert torch.allclose(target[i], x_lo[i]) and torch.allclose(x_lo[i:i + 1], exp_lo, atol=1e-6)
            else:
                exp_lo = ode_solve(teacher, x_hi[i:i + 1], [float(t_hi[i]), float(t_lo[i])], solver="heun")
                assert torch.allclose(x_lo[i:i + 1], exp_lo, atol=1e-6)
                exp_t = nets["target"](exp_lo, t_lo[i:i + 1].float())
                assert torch.allclose(target[i:i + 1], exp_t, atol=1e-6)


def test_cd_loss_is_differentiable():
    teacher = load_teacher("toy:checkerboard").requires_grad_(False)
    method = get_method("cd")(teacher)
    nets = {k: r.module for k, r in method.networks().items()}
    out = method.loss("student", Batch(size=16, x0=torch.randn(16, 2)), nets, _ctx())
    out["loss"].backward()
    assert out["loss"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["student"].parameters())


def test_distances():
    teacher = load_teacher("toy:checkerboard")
    d = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    cd = get_method("cd")(teacher, build_method_config("cd", {"huber_c": 0.01}))
    # pseudo-Huber over the sample: 0 for a perfect match, |d| - c far away
    assert torch.allclose(cd.distance(d), torch.tensor([0.0, (25 + 1e-4) ** 0.5 - 0.01]))
    lcm = get_method("lcm")(teacher)  # LCM: per element (c = 1e-3), averaged
    assert torch.allclose(lcm.distance(d), torch.tensor([0.0, ((9 + 1e-6) ** 0.5 + (16 + 1e-6) ** 0.5) / 2 - 1e-3]))
    l2 = get_method("cd")(teacher, build_method_config("cd", {"loss": "l2"}))
    assert torch.allclose(l2.distance(d), torch.tensor([0.0, 12.5]))


def test_grid_follows_the_teachers_process():
    from fewstep.diffusion import EDM, RectifiedFlow
    from fewstep.methods.consistency import consistency_grid

    edm = consistency_grid(EDM(), 18)
    assert float(edm[0]) == pytest.approx(80.0) and float(edm[-1]) == pytest.approx(0.002)  # Karras, rho 7
    vp = consistency_grid(VPDiscrete.from_schedule("scaled_linear"), 1000)
    assert vp.tolist() == [float(t) for t in range(999, -1, -1)]  # integer timesteps: LCM's skip 20 is 999 -> 979
    assert consistency_grid(RectifiedFlow(), 4).tolist() == [1.0, 0.75, 0.5, 0.25]


def test_lcm_teacher_step_is_guided_per_sample():
    teacher = load_teacher("digits").requires_grad_(False)
    method = get_method("lcm")(teacher, build_method_config("lcm", {"num_timesteps": 10, "skip": 2,
                                                                    "spacing": "uniform"}))
    nets = {k: r.module for k, r in method.networks().items()}
    x_hi = torch.randn(3, 1, 8, 8)
    y = torch.tensor([1, 2, 3])
    w = torch.tensor([1.0, 2.0, 3.0])
    t_hi, t_lo = method.grid[[0, 2, 4]], method.grid[[2, 4, 6]]
    with torch.no_grad():
        x_lo, _ = method._target(nets, x_hi, t_hi, t_lo, torch.zeros(3, dtype=torch.bool), y, w, w)
        for i in range(3):
            exp = ode_solve(teacher, x_hi[i:i + 1], [float(t_hi[i]), float(t_lo[i])], solver="euler",
                            cond=y[i:i + 1], guidance=float(w[i]))
            assert torch.allclose(x_lo[i:i + 1], exp, atol=1e-5)
        assert not torch.allclose(x_lo[2:3], ode_solve(teacher, x_hi[2:3], [float(t_hi[2]), float(t_lo[2])],
                                                       solver="euler", cond=y[2:3], guidance=1.0), atol=1e-4)


def test_lcm_student_takes_the_guidance_scale_and_starts_as_the_conditional_teacher():
    teacher = load_teacher("digits").requires_grad_(False)
    method = get_method("lcm")(teacher)
    student = method.networks()["student"].module
    assert student.guidance_embedded and not teacher.guidance_embedded
    x = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 0.6)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        cond_teacher = teacher(x, t, y)  # guidance 1 = the conditional prediction
        for w in (1.0, 2.5, torch.tensor([1.0, 2.0, 3.0, 4.0])):
            assert torch.allclose(student(x, t, y, w), cond_teacher, atol=1e-5)
    # the guidance input changes the output once its (zero-initialised) last layer is trained
    torch.nn.init.normal_(student.net.embed.guidance_mlp[2].weight)
    with torch.no_grad():
        assert not torch.allclose(student(x, t, y, 1.0), student(x, t, y, 3.0))


def test_bad_options_are_one_line_errors():
    teacher = load_teacher("toy:checkerboard")
    for opts, needle in (({"solver": "rk4"}, "unknown solver"), ({"loss": "l1"}, "unknown loss"),
                         ({"skip": 50}, "skip"), ({"guidance_min": 3, "guidance_max": 1}, "guidance_min")):
        with pytest.raises(FewstepError, match=needle):
            get_method("cd")(teacher, build_method_config("cd", opts))
