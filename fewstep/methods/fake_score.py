"""What every method with a generator, a frozen real score and a trained fake score shares (DMD, DMD2, SiD,
TDM, and rCM's regulariser): the three roles, the critic and generator phases with their update ratio, the
generator's time list, noising at a fraction of the teacher's time range, x0_real - x0_fake at a noisy state, and
the per-sample normaliser mean|x - x0_real| (DMD2, SiD, TDM).

The real score is the teacher guided with the run's --guidance; the fake score starts as a copy of the teacher
(`student_from_teacher`: another LoRA adapter on its weights for diffusers teachers) and follows the generator.
The generator's own sampling path is `fewstep.sampling.rollout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.diffusion.timesteps import SPACINGS, sampling_timesteps
from fewstep.errors import FewstepError, check_choice
from fewstep.methods.base import DistillMethod, MethodConfig, Phase, Role, StepContext
from fewstep.sampling.solvers import resolve_timesteps


@dataclass
class FakeScoreConfig(MethodConfig):
    """Options shared by every method with a generator, the teacher as real score and a trained fake score."""

    steps: int = 1  # generator steps K (DMD2's multi-step students: 4)
    spacing: str = "trailing"  # the K generator times: VP 999, 749, 499, 249; flow 1, 0.75, 0.5, 0.25
    timesteps: list[float] | None = None  # explicit decreasing generator times (overrides steps and spacing)
    update_ratio: int = 1  # critic updates per generator update
    fake_lr_scale: float = 1.0  # TTUR by learning-rate ratio: critic lr = run lr * fake_lr_scale
    student_beta1: float = 0.9  # Adam beta1 of the generator
    critic_beta1: float = 0.9  # Adam beta1 of the fake score (and GAN head)
    beta2: float = 0.999  # Adam beta2 of all of them
    normalize: bool = True  # divide the generator's update by mean|x - x0_real| per sample


class FakeScoreMethod(DistillMethod):
    """Generator (student) + frozen real score (teacher) + fake score trained on generator samples: the roles,
    phases, generator times, noising and score gap shared by DMD, DMD2, SiD and TDM (the generator's own path is
    `fewstep.sampling.rollout`)."""

    config_class = FakeScoreConfig
    description = ""

    def __init__(self, teacher, config=None, *, guidance: float = 1.0):
        super().__init__(teacher, config, guidance=guidance)
        c = self.config
        if teacher.data_shape is None:
            raise FewstepError(f"{self.name or 'this method'} needs a teacher that records its data shape")
        if c.timesteps is not None:
            ts = resolve_timesteps(teacher.process, timesteps=c.timesteps)
        else:
            check_choice("spacing", c.spacing, SPACINGS)
            if int(c.steps) < 1:
                raise FewstepError(f"steps must be >= 1, got {c.steps}")
            ts = self.step_times(int(c.steps))
        self.gen_times = ts  # float64, CPU, decreasing
        if int(c.update_ratio) < 1:
            raise FewstepError(f"update_ratio must be >= 1, got {c.update_ratio}")
        if not (0.0 <= c.student_beta1 < 1 and 0.0 <= c.critic_beta1 < 1 and 0.0 <= c.beta2 < 1):
            raise FewstepError("Adam betas must be in [0, 1)")

    def step_times(self, k: int) -> torch.Tensor:
        """The generator's k decreasing times with the configured spacing (float64, CPU)."""
        proc = self.teacher.process
        return resolve_timesteps(proc, timesteps=sampling_timesteps(proc, int(k), self.config.spacing))

    def span(self, lo: float, hi: float) -> tuple[float, float]:
        p = self.teacher.process
        return p.t_min + lo * (p.t_max - p.t_min), p.t_min + hi * (p.t_max - p.t_min)

    def times(self, n: int, ctx: StepContext, lo: float, hi: float) -> torch.Tensor:
        """n times uniform on [lo, hi] as fractions of the teacher's time range (float32, on the device)."""
        a, b = self.span(lo, hi)
        return (a + (b - a) * ctx.rand(n)).to(ctx.device, torch.float32)

    def noised(self, x: torch.Tensor, ctx: StepContext, lo: float, hi: float):
        """(x_t, t, eps): x noised at t ~ U[lo, hi] (fractions of the time range) with fresh eps."""
        t = self.times(x.shape[0], ctx, lo, hi)
        eps = ctx.randn(x.shape)
        return self.teacher.process.add_noise(x, eps, t), t, eps

    def networks(self) -> dict[str, Role]:
        c = self.config
        return {
            "teacher": Role(self.teacher),
            "student": Role(self.student_from_teacher(), trainable=True, betas=(c.student_beta1, c.beta2)),
            "fake_score": Role(self.student_from_teacher(), trainable=True, lr_scale=c.fake_lr_scale,
                               betas=(c.critic_beta1, c.beta2)),
        }

    def critic_roles(self) -> tuple[str, ...]:
        return ("fake_score",)

    def phases(self) -> list[Phase]:
        return [Phase("critic", self.critic_roles()),
                Phase("generator", ("student",), every=int(self.config.update_ratio))]

    def eval_steps(self) -> tuple[int, ...]:
        """A one-step generator is only ever trained at the start of its path: the table scores 1 step; a
        K-step generator 1, 2 (when K >= 2) and K steps."""
        k = len(self.gen_times)
        return tuple(sorted({1, min(2, k), k}))

    def student_meta(self) -> dict:
        k = len(self.gen_times)
        return {"default_solver": "fewstep", "default_steps": k, "default_renoise": "fresh",
                "timesteps": {str(k): [float(t) for t in self.gen_times]}}

    def real_minus_fake(self, nets, x_t: torch.Tensor, t: torch.Tensor, cond,
                        steps=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Under no_grad: (x0_real - x0_fake, x0_real) at x_t, the real score guided with the run's --guidance, the
        fake score unguided (and told the sampling step count `steps` when its distribution depends on it: TDM)."""
        with torch.no_grad():
            real = nets["teacher"](x_t, t, cond, self.guidance).float()
            fake = (nets["fake_score"](x_t, t, cond) if steps is None
                    else nets["fake_score"](x_t, t, cond, steps=steps)).float()
        return real - fake, real

    @staticmethod
    def normaliser(x: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
        """The per-sample scale mean|x - x0_real| (over all but the batch dim; DMD2, TDM, SiD), at least 1e-5."""
        return (x.detach().float() - x0_real.detach().float()).abs().flatten(1).mean(1).clamp_min(1e-5)
