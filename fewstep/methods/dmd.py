"""Distribution matching: DMD (Yin et al. 2024a), DMD2 (Yin et al. 2024b) and SiD (Zhou et al. 2024).

Three networks: the generator (the student, initialised from the teacher), the frozen real score
(the teacher, guided with the run's --guidance) and the fake score (initialised from the teacher and
trained with the teacher's own denoising loss on generator samples, unguided).

DMD generator update: x = G(z); x_t = alpha_t x + sigma_t eps at t ~ U[t_lo, t_hi];
    grad = (x0_fake(x_t) - x0_real(x_t)) / mean|x - x0_real(x_t)|,    loss = 0.5 ||x - sg(x - grad)||^2,
so x moves along x0_real - x0_fake, which is (sigma_t^2 / alpha_t) times score_real - score_fake at x_t.
`dmd` adds a regression loss to teacher (noise, sample) pairs made with the shared sampler engine.
`dmd2` drops it and adds TTUR (critic updates per generator update), an optional GAN (a classifier head
on the fake score's features; non-saturating loss on noised real vs generated samples) and multi-step
generators trained on inputs from their own backward simulation. `sid` keeps the three networks and
replaces the generator loss by SiD's (f_r - f_f) . ((f_r - x) - alpha (f_r - f_f)) / mean|x - f_r|,
back-propagated through both scores' inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fewstep.diffusion.predictions import prediction_coeffs
from fewstep.diffusion.processes import expand_like
from fewstep.diffusion.timesteps import SPACINGS, sampling_timesteps
from fewstep.errors import FewstepError, check_choice
from fewstep.methods.base import Batch, DistillMethod, MethodConfig, Phase, Role, StepContext, register_method
from fewstep.sampling.solvers import ODE_SOLVERS, resolve_timesteps


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


@dataclass
class DistributionMatchingConfig(FakeScoreConfig):
    backward_sim: bool = True  # K > 1: the input at t_k comes from the generator's own rollout, else noised data
    t_min: float = 0.02  # distribution-matching (and GAN) times: U[t_min, t_max] as fractions of the time range
    t_max: float = 0.98
    fake_t_min: float = 0.0  # fake-score denoising times, fractions likewise
    fake_t_max: float = 1.0
    gan: bool = False  # DMD2's GAN on the fake score's features (needs real data: --data or the teacher's)
    gan_gen_weight: float = 3e-3  # generator's non-saturating GAN loss weight
    gan_critic_weight: float = 1e-2  # GAN head's classification loss weight
    gan_lr_scale: float = 1.0  # GAN head lr = run lr * gan_lr_scale
    regression_weight: float = 0.0  # DMD's regression loss to teacher (noise, sample) pairs (DMD: 0.25)
    regression_pairs: int = 1024  # pairs made with the teacher at start (when `pairs` is not given)
    regression_steps: int | None = None  # teacher steps for those pairs (default: the teacher's own)
    regression_solver: str | None = None  # their solver (default: the teacher's own)
    pairs: str | None = None  # a pairs directory written by `fewstep pairs` (reused instead of making pairs)


@dataclass
class DMDConfig(DistributionMatchingConfig):
    regression_weight: float = 0.25


@dataclass
class DMD2Config(DistributionMatchingConfig):
    update_ratio: int = 5


@dataclass
class SiDConfig(DistributionMatchingConfig):
    student_beta1: float = 0.0  # Adam(0, 0.999) for both, as in SiD
    critic_beta1: float = 0.0
    sid_alpha: float = 1.2  # SiD's alpha


class FakeScoreMethod(DistillMethod):
    """Generator (student) + frozen real score (teacher) + fake score trained on generator samples: the roles,
    phases, generator times and the generator's own rollout shared by DMD, DMD2, SiD and TDM."""

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

    def _span(self, lo: float, hi: float) -> tuple[float, float]:
        p = self.teacher.process
        return p.t_min + lo * (p.t_max - p.t_min), p.t_min + hi * (p.t_max - p.t_min)

    def _times(self, n: int, ctx: StepContext, lo: float, hi: float) -> torch.Tensor:
        """n times uniform on [lo, hi] as fractions of the teacher's time range (float32, on the device)."""
        a, b = self._span(lo, hi)
        return (a + (b - a) * ctx.rand(n)).to(ctx.device, torch.float32)

    def _noised(self, x: torch.Tensor, ctx: StepContext, lo: float, hi: float):
        """(x_t, t, eps): x noised at t ~ U[lo, hi] (fractions of the time range) with fresh eps."""
        t = self._times(x.shape[0], ctx, lo, hi)
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

    def rollout(self, student, noise: torch.Tensor, times: torch.Tensor, cond, ctx: StepContext, upto: int,
                renoise: str = "fresh") -> list[torch.Tensor]:
        """The generator's own sampling path under no_grad: states at times[0..upto] (state 0 is `noise`, the
        prior sample at times[0]); x0 = G(x_{t_i}), then x_{t_{i+1}} = alpha x0 + sigma z with z fresh noise
        (DMD2's backward simulation) or the eps implied by the prediction ("deterministic": DDIM, as TDM samples)."""
        proc, b = self.teacher.process, noise.shape[0]
        states, x = [noise], noise
        with torch.no_grad():
            for i in range(int(upto)):
                t = times[i]
                x0 = student(x, t.to(ctx.device, torch.float32).expand(b), cond).float()
                if renoise == "fresh":
                    z = ctx.randn(noise.shape)
                else:
                    z = (x - float(proc.alpha(t)) * x0) / float(proc.sigma(t))
                t_next = times[i + 1]
                x = float(proc.alpha(t_next)) * x0 + float(proc.sigma(t_next)) * z
                states.append(x)
        return states

    def real_minus_fake(self, nets, x_t: torch.Tensor, t: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """Under no_grad: (x0_real - x0_fake, x0_real) at x_t, the real score guided with the run's --guidance."""
        with torch.no_grad():
            real = nets["teacher"](x_t, t, cond, self.guidance).float()
            fake = nets["fake_score"](x_t, t, cond).float()
        return real - fake, real

    @staticmethod
    def normaliser(x: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
        """The per-sample scale mean|x - x0_real| (over all but the batch dim; DMD2, TDM, SiD), at least 1e-5."""
        return (x.detach().float() - x0_real.detach().float()).abs().flatten(1).mean(1).clamp_min(1e-5)


class DistributionMatching(FakeScoreMethod):
    """DMD's objective family on the shared machinery; subclasses choose the generator loss (`generator_objective`)."""

    config_class = DistributionMatchingConfig

    def __init__(self, teacher, config=None, *, guidance: float = 1.0):
        super().__init__(teacher, config, guidance=guidance)
        c = self.config
        for lo, hi, name in ((c.t_min, c.t_max, "t_min/t_max"), (c.fake_t_min, c.fake_t_max, "fake_t_min/fake_t_max")):
            if not 0.0 <= lo < hi <= 1.0:
                raise FewstepError(f"{name} must satisfy 0 <= min < max <= 1 (fractions of the time range), "
                                   f"got {lo} and {hi}")
        if c.regression_weight < 0 or c.gan_gen_weight < 0 or c.gan_critic_weight < 0:
            raise FewstepError("loss weights must be >= 0")
        if c.regression_weight > 0 and len(self.gen_times) > 1:
            raise FewstepError("the regression loss (DMD) is for one-step generators; use steps=1 or "
                               "regression_weight=0")
        if c.regression_solver is not None:
            check_choice("regression_solver", c.regression_solver, ODE_SOLVERS)
        self.pairs = None

    # -- setup ----------------------------------------------------------------------------------------
    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        c = self.config
        return bool(c.gan) or (len(self.gen_times) > 1 and not c.backward_sim)

    def networks(self) -> dict[str, Role]:
        c = self.config
        roles = super().networks()
        if c.gan:
            roles["discriminator"] = Role(self._make_head(roles["fake_score"].module), trainable=True,
                                          lr_scale=c.gan_lr_scale, betas=(c.critic_beta1, c.beta2))
        if c.regression_weight > 0:
            self.pairs = self._regression_pairs()
        return roles

    def critic_roles(self) -> tuple[str, ...]:
        return ("fake_score", "discriminator") if self.config.gan else ("fake_score",)

    def _make_head(self, fake_score):
        """A GAN head sized by one forward pass of the fake score."""
        from fewstep.models.gan import DiscriminatorHead, capture_features, feature_layer

        device = next(fake_score.parameters()).device
        x = torch.zeros((1, *self.teacher.data_shape), device=device)
        t = torch.full((1,), float(self.gen_times[0]), device=device)
        cond = self.teacher.null_condition(1, device) if self.teacher.conditional else None
        with torch.no_grad(), capture_features(feature_layer(fake_score)) as store:
            fake_score(x, t, cond)
        return DiscriminatorHead(tuple(store["features"].shape[1:])).to(device)

    def _regression_pairs(self):
        from fewstep.sampling.pairs import load_pairs, make_pairs

        c = self.config
        if c.pairs:
            pairs = load_pairs(c.pairs)
            if tuple(pairs.x.shape[1:]) != tuple(self.teacher.data_shape):
                raise FewstepError(f"pairs in {c.pairs!r} have shape {tuple(pairs.x.shape[1:])}, the teacher "
                                   f"{tuple(self.teacher.data_shape)}")
            return pairs
        meta = self.teacher.meta
        return make_pairs(self.teacher, int(c.regression_pairs),
                          steps=int(c.regression_steps or meta.get("default_steps", 50)),
                          solver=c.regression_solver or meta.get("default_solver", "heun"), seed=0,
                          guidance=self.guidance)

    # -- pieces -------------------------------------------------------------------------------------
    def generate(self, student, batch: Batch, ctx: StepContext) -> torch.Tensor:
        """Generator samples x0 for a batch (differentiable through the last generator call).

        One step: x = G(prior noise at t_0). K steps (DMD2): pick k ~ U{0..K-1} per sample; the input at
        t_k is the generator's own K-step rollout stopped there (backward simulation: x0 = G(x_{t_i}),
        x_{t_{i+1}} = alpha x0 + sigma * fresh noise, under no_grad), or noised real data.
        """
        proc, ts = self.teacher.process, self.gen_times
        shape = (batch.size, *self.teacher.data_shape)
        noise = ctx.randn(shape) * float(proc.prior_std(ts[0]))
        if len(ts) == 1:
            return student(noise, ts[0].to(ctx.device, torch.float32).expand(batch.size), batch.cond)
        k = ctx.randint(0, len(ts), batch.size)
        t_in = ts[k].to(ctx.device, torch.float32)
        if self.config.backward_sim:
            states = self.rollout(student, noise, ts, batch.cond, ctx, int(k.max()), renoise="fresh")
            x_in = torch.stack(states)[k.to(ctx.device), torch.arange(batch.size, device=ctx.device)]
        else:
            x_in = proc.add_noise(batch.x0.float(), ctx.randn(shape), t_in)
        return student(x_in, t_in, batch.cond)

    def dm_loss(self, nets, x: torch.Tensor, cond, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """DMD's generator loss 0.5 ||x - sg(x - grad)||^2 (mean over elements), grad as in the module doc."""
        c = self.config
        x_t, t, _ = self._noised(x.detach().float(), ctx, c.t_min, c.t_max)
        gap, real = self.real_minus_fake(nets, x_t, t, cond)
        grad = -gap  # x0_fake - x0_real
        if c.normalize:
            grad = grad / expand_like(self.normaliser(x, real), grad)
        grad = torch.nan_to_num(grad)
        loss = 0.5 * F.mse_loss(x.float(), x.detach().float() - grad)
        return loss, {"dm_grad": grad.pow(2).flatten(1).sum(1).sqrt().mean()}

    def sid_loss(self, nets, x: torch.Tensor, cond, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """SiD's generator loss (f_r - f_f) . ((f_r - x) - alpha (f_r - f_f)) / mean|x - f_r| (mean over
        elements), with gradients through both scores' inputs (their weights stay frozen)."""
        c = self.config
        x_t, t, _ = self._noised(x.float(), ctx, c.t_min, c.t_max)
        real = nets["teacher"](x_t, t, cond, self.guidance).float()
        fake = nets["fake_score"](x_t, t, cond).float()
        diff = real - fake
        loss = diff * ((real - x.float()) - c.sid_alpha * diff)
        if c.normalize:
            loss = loss / expand_like(self.normaliser(x, real), loss)
        return loss.mean(), {"score_gap": diff.detach().pow(2).flatten(1).sum(1).sqrt().mean()}

    def gan_logits(self, nets, x: torch.Tensor, cond, ctx: StepContext) -> torch.Tensor:
        """The GAN head's logits on the fake score's features of x noised at t ~ U[t_min, t_max]."""
        from fewstep.models.gan import capture_features, feature_layer

        x_t, t, _ = self._noised(x.float(), ctx, self.config.t_min, self.config.t_max)
        with capture_features(feature_layer(nets["fake_score"])) as store:
            nets["fake_score"](x_t, t, cond)
        return nets["discriminator"](store["features"]).float()

    def regression_loss(self, nets, batch: Batch, ctx: StepContext) -> torch.Tensor:
        """DMD's regression: mean squared error between G(z) and the teacher's ODE output x for stored pairs."""
        noise, x_ref, cond = self.pairs.sample(batch.size, ctx.generator)
        t0 = self.gen_times[0]
        noise = noise.to(ctx.device) * float(self.teacher.process.prior_std(t0))
        cond = cond.to(ctx.device) if cond is not None else None
        out = nets["student"](noise, t0.to(ctx.device, torch.float32).expand(batch.size), cond)
        return F.mse_loss(out.float(), x_ref.to(ctx.device).float())

    def denoising_loss(self, fake_score, x: torch.Tensor, cond, ctx: StepContext) -> torch.Tensor:
        """The teacher's own objective on generator samples: MSE of the fake score's native prediction
        against a(t) x + b(t) eps (eps, v, velocity or x0, whichever the teacher predicts)."""
        c = self.config
        x_t, t, eps = self._noised(x, ctx, c.fake_t_min, c.fake_t_max)
        kind = self.teacher.prediction
        a, b = prediction_coeffs(kind, self.teacher.process, t.double())
        target = expand_like(a.float(), x) * x + expand_like(b.float(), x) * eps
        pred = fake_score(x_t, t, cond, 1.0, kind=kind)
        return F.mse_loss(pred.float(), target)

    # -- the loss of each phase ----------------------------------------------------------------------
    def loss(self, phase, batch, nets, ctx):
        c = self.config
        if phase == "critic":
            with torch.no_grad():
                x = self.generate(nets["student"], batch, ctx).float()
            denoise = self.denoising_loss(nets["fake_score"], x, batch.cond, ctx)
            out = {"loss": denoise, "denoise": denoise.detach()}
            if c.gan:
                real = self.gan_logits(nets, batch.x0, batch.cond, ctx)
                fake = self.gan_logits(nets, x, batch.cond, ctx)
                gan = F.softplus(-real).mean() + F.softplus(fake).mean()
                out["loss"] = out["loss"] + c.gan_critic_weight * gan
                out.update(gan_d=gan.detach(), d_real=torch.sigmoid(real).mean().detach(),
                           d_fake=torch.sigmoid(fake).mean().detach())
            return out
        x = self.generate(nets["student"], batch, ctx)
        total, logs = self.generator_objective(nets, x, batch.cond, ctx)
        out = {"dm": total.detach(), **logs}
        if c.gan:
            gan = F.softplus(-self.gan_logits(nets, x, batch.cond, ctx)).mean()
            total = total + c.gan_gen_weight * gan
            out["gan_g"] = gan.detach()
        if c.regression_weight > 0:
            reg = self.regression_loss(nets, batch, ctx)
            total = total + c.regression_weight * reg
            out["regression"] = reg.detach()
        out["loss"] = total
        return out

    def generator_objective(self, nets, x, cond, ctx):  # pragma: no cover - abstract
        raise NotImplementedError


@register_method("dmd")
class DMD(DistributionMatching):
    config_class = DMDConfig
    description = ("DMD (Yin et al. 2024a): distribution matching with a fake score, plus regression to teacher "
                   "(noise, sample) pairs")

    def generator_objective(self, nets, x, cond, ctx):
        return self.dm_loss(nets, x, cond, ctx)


@register_method("dmd2")
class DMD2(DMD):
    config_class = DMD2Config
    description = ("DMD2 (Yin et al. 2024b): distribution matching, TTUR (5 critic updates per generator update), "
                   "optional GAN on the fake score's features, multi-step backward simulation")


@register_method("sid")
class SiD(DistributionMatching):
    config_class = SiDConfig
    description = "SiD (Zhou et al. 2024): score identity distillation on the same three networks"

    def generator_objective(self, nets, x, cond, ctx):
        return self.sid_loss(nets, x, cond, ctx)
