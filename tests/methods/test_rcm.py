"""rCM: the sCM term plus DMD2's regulariser on the student's own backward simulation; critic weighting;
update ratio; resume."""

from __future__ import annotations

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.methods import Batch, StepContext, build_method_config, get_method
from fewstep.teachers import load_teacher
from fewstep.training import checkpoint as ckpt
from fewstep.training import distill

FAST = dict(teacher="toy:checkerboard", batch_size=32, eval=False, sample_every=0, warmup=2, log_every=1)


def ctx(seed=0, iteration=0):
    return StepContext(iteration=iteration, generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"))


def rcm(**opts):
    return get_method("rcm")(load_teacher("toy:checkerboard"), build_method_config("rcm", opts))


def test_roles_and_phases():
    m = rcm()
    roles = m.networks()
    assert set(roles) == {"student", "teacher", "fake_score", "weighting"}
    assert roles["fake_score"].trainable and not roles["teacher"].trainable
    phases = m.phases()
    assert [(p.name, p.trains, p.every) for p in phases] == [("critic", ("fake_score",), 1),
                                                             ("student", ("student", "weighting"), 5)]
    assert len(m.dm.gen_times) == 4  # backward simulation over 1..4 steps
    with pytest.raises(FewstepError, match="mode must be distill"):
        rcm(mode="train")


def test_student_loss_is_the_scm_term_plus_the_weighted_dmd_term():
    m0, m1 = rcm(dmd_weight=0.0), rcm(dmd_weight=2.0)
    nets0 = {k: r.module for k, r in m0.networks().items()}
    nets1 = {k: r.module for k, r in m1.networks().items()}
    nets1.update({k: nets0[k] for k in ("student", "weighting", "fake_score")})  # the same networks
    torch.nn.init.normal_(nets0["fake_score"].net.out.weight, std=0.05)  # a fake score unlike the teacher
    x0 = torch.randn(64, 2)
    batch = Batch(size=64, x0=x0)
    plain = m0.loss("student", batch, nets0, ctx(1, iteration=10))
    both = m1.loss("student", batch, nets1, ctx(1, iteration=10))  # scm draws first: the same sCM term
    assert "dm" not in plain and float(both["dm"]) > 0
    expected = float(plain["loss"].detach()) + 2.0 * float(both["dm"])
    assert float(both["loss"].detach()) == pytest.approx(expected, rel=1e-5)
    both["loss"].backward()
    assert all(p.grad is None for p in nets0["fake_score"].parameters())  # the critic is not trained here
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets0["student"].parameters())


def test_critic_regresses_x0_with_weight_one_plus_sigma_d_squared_snr():
    m = rcm(sigma_d=0.5)
    nets = {k: r.module for k, r in m.networks().items()}
    x = torch.randn(32, 2)
    loss = m.critic_loss(nets["fake_score"], x, None, ctx(4))
    x_t, t, _ = m.dm.noised(x, ctx(4), 0.02, 0.98)
    with torch.no_grad():
        pred = nets["fake_score"](x_t, t)
    snr = ((1 - t) / t) ** 2
    expected = (((pred - x) ** 2).mean(1) * (1 + 0.25 * snr)).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_update_ratio_and_resume(tmp_path, resume_matches):
    run = tmp_path / "ratio"
    distill(method="rcm", out=str(run), iters=6, options={"update_ratio": 3, "jvp": "fd"}, **FAST)
    tensors, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert float(tensors["opt.fake_score.0.step"]) == 6 and float(tensors["opt.student.0.step"]) == 2
    resume_matches(tmp_path / "resume", method="rcm", options={"update_ratio": 2, "jvp": "fd"}, **FAST)
