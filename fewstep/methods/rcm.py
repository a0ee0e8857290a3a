"""rCM (Zheng et al. 2025, "Large scale diffusion distillation via score-regularized continuous-time
consistency"): sCM's continuous-time consistency term plus a DMD2-style distribution-matching regulariser.

The student (a Denoiser in the teacher's process, seen in TrigFlow by the sCM term) is trained with
    loss = scm_loss(real data)  +  dmd_weight * dm_loss(x),
x = the student's own backward simulation: 1 to `sim_steps` steps from pure noise, fresh re-noise between
them, gradient through the last step only (DMD2's `generate`). The DMD term is DMD2's: x noised at
t ~ U[dm_t_min, dm_t_max] (fractions of the time range, optionally shifted towards noise), update along
x0_teacher_cfg - x0_fake divided by mean|x - x0_teacher_cfg|. The fake score (initialised from the teacher)
is trained on the student's samples by x0 regression weighted by 1/sin^2(tau), tau the TrigFlow time with
the same SNR (1/sin^2 tau = 1 + sigma_d^2 SNR). The critic is updated every iteration, the student every
`update_ratio` iterations (rCM: 5). Everything else (the sCM term, its JVP backends, weighting, time
sampling) is `fewstep.methods.scm`; everything DMD is `fewstep.methods.dmd`, reused, not copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.errors import FewstepError
from fewstep.methods.base import Phase, Role
from fewstep.methods.dmd import DMD2, DMD2Config
from fewstep.methods.registry import register_method
from fewstep.methods.scm import ContinuousConsistency, SCMConfig


@dataclass
class RCMConfig(SCMConfig):
    dmd_weight: float = 1.0  # weight of the distribution-matching regulariser
    update_ratio: int = 5  # critic (fake score) updates per student update
    sim_steps: int = 4  # the student's backward simulation: 1..sim_steps steps (gradient through the last)
    dm_t_min: float = 0.02  # DMD times: U[dm_t_min, dm_t_max] as fractions of the teacher's time range
    dm_t_max: float = 0.98
    fake_lr_scale: float = 1.0  # critic lr = run lr * fake_lr_scale


@register_method("rcm")
class RCM(ContinuousConsistency):
    config_class = RCMConfig
    description = ("rCM (Zheng et al. 2025): the sCM term plus a DMD2 regulariser on the student's own backward "
                   "simulation; fake score updated every iteration, the student every update_ratio")
    # sCM's settings for the consistency term; the critic learns at 20x the student's (small) lr; on these small
    # teachers the student is updated every iteration with the DMD term on its 1-step samples (at sCM's budget,
    # rCM's 5:1 ratio and 1-4 step simulation left the 1-step sample behind sCM's)
    recipes = {
        "2d": {"iters": 4000, "batch_size": 256, "lr": 5e-5, "ema_decay": 0.995,
               "options": {"sigma_d": 1.0, "tangent_warmup": 500, "fake_lr_scale": 20.0, "update_ratio": 1,
                           "sim_steps": 1}},
        "image": {"iters": 2000, "batch_size": 128, "lr": 5e-5, "ema_decay": 0.999,
                  "options": {"sigma_d": 0.5, "tangent_warmup": 500, "fake_lr_scale": 20.0, "update_ratio": 1,
                              "sim_steps": 1}},
    }

    def __init__(self, teacher, config=None, *, guidance: float = 1.0):
        super().__init__(teacher, config, guidance=guidance)
        c = self.config
        if c.mode != "distill":
            raise FewstepError("rcm distills a teacher: its DMD term needs the teacher's score (mode must be distill)")
        if c.dmd_weight < 0 or int(c.update_ratio) < 1 or int(c.sim_steps) < 1:
            raise FewstepError(f"need dmd_weight >= 0, update_ratio >= 1 and sim_steps >= 1, got {c.dmd_weight}, "
                               f"{c.update_ratio} and {c.sim_steps}")
        self.dm = DMD2(teacher, DMD2Config(steps=int(c.sim_steps), t_min=c.dm_t_min, t_max=c.dm_t_max,
                                           update_ratio=int(c.update_ratio), fake_lr_scale=c.fake_lr_scale),
                       guidance=guidance)

    def networks(self) -> dict[str, Role]:
        roles = super().networks()
        roles["teacher"] = Role(self.teacher)
        roles["fake_score"] = Role(self.student_from_teacher(), trainable=True, lr_scale=self.config.fake_lr_scale,
                                   betas=(0.9, 0.99))
        return roles

    def phases(self) -> list[Phase]:
        student = super().phases()[0]
        return [Phase("critic", ("fake_score",)),
                Phase(student.name, student.trains, every=int(self.config.update_ratio))]

    def critic_loss(self, fake_score, x: torch.Tensor, cond, ctx) -> torch.Tensor:
        """x0 regression of the fake score on the student's samples, weighted by 1/sin^2 tau = 1 + sigma_d^2 SNR."""
        c = self.config
        x_t, t, _ = self.dm.noised(x, ctx, c.dm_t_min, c.dm_t_max)
        r = self.teacher.process.ratio(t.double())
        weight = (1.0 + c.sigma_d ** 2 / (r * r)).float().to(x.device)
        pred = fake_score(x_t, t, cond).float()
        return ((pred - x) ** 2).flatten(1).mean(1).mul(weight).mean()

    def loss(self, phase, batch, nets, ctx):
        c = self.config
        if phase == "critic":
            with torch.no_grad():
                x = self.dm.generate(nets["student"], batch, ctx).float()
            loss = self.critic_loss(nets["fake_score"], x, batch.cond, ctx)
            return {"loss": loss, "fake": loss.detach()}
        out = self.scm_loss(batch, nets, ctx)
        if c.dmd_weight > 0:
            x = self.dm.generate(nets["student"], batch, ctx)
            dm, logs = self.dm.dm_loss(nets, x, batch.cond, ctx)
            out["loss"] = out["loss"] + c.dmd_weight * dm
            out["dm"] = dm.detach()
            out.update(logs)
        return out

