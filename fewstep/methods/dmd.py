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
from fewstep.errors import FewstepError, check_choice
from fewstep.methods.base import Batch, Role, StepContext
from fewstep.methods.fake_score import FakeScoreConfig, FakeScoreMethod
from fewstep.methods.registry import register_method
from fewstep.sampling.rollout import rollout
from fewstep.sampling.solvers import ODE_SOLVERS


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
            with torch.no_grad():  # the generator's own K-step path (fresh re-noise), stopped at each sample's t_k
                path = rollout(proc, lambda x, t, rows: student(x, t.to(ctx.device, torch.float32).expand(x.shape[0]),
                                                                 batch.cond).float(),
                               noise, ts, renoise="fresh", fresh=lambda i, x, rows: ctx.randn(noise.shape),
                               steps=int(k.max()), capture=True)
            x_in = torch.stack(path.xs)[k.to(ctx.device), torch.arange(batch.size, device=ctx.device)]
        else:
            x_in = proc.add_noise(batch.x0.float(), ctx.randn(shape), t_in)
        return student(x_in, t_in, batch.cond)

    def dm_loss(self, nets, x: torch.Tensor, cond, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """DMD's generator loss 0.5 ||x - sg(x - grad)||^2 (mean over elements), grad as in the module doc."""
        c = self.config
        x_t, t, _ = self.noised(x.detach().float(), ctx, c.t_min, c.t_max)
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
        x_t, t, _ = self.noised(x.float(), ctx, c.t_min, c.t_max)
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

        x_t, t, _ = self.noised(x.float(), ctx, self.config.t_min, self.config.t_max)
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
        x_t, t, eps = self.noised(x, ctx, c.fake_t_min, c.fake_t_max)
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
    recipes = {
        "2d": {"iters": 2000, "batch_size": 256, "lr": 3e-4},
        "image": {"iters": 1500, "batch_size": 128, "lr": 1e-4},
    }

    def generator_objective(self, nets, x, cond, ctx):
        return self.dm_loss(nets, x, cond, ctx)


@register_method("dmd2")
class DMD2(DMD):
    config_class = DMD2Config
    description = ("DMD2 (Yin et al. 2024b): distribution matching, TTUR (5 critic updates per generator update), "
                   "optional GAN on the fake score's features, multi-step backward simulation")
    # DMD2 keeps its 5:1 update ratio, so the generator gets iters / 5 updates
    recipes = {
        "2d": {"iters": 6000, "batch_size": 256, "lr": 1e-3},
        "image": {"iters": 2000, "batch_size": 128, "lr": 2e-4},
    }


@register_method("sid")
class SiD(DistributionMatching):
    config_class = SiDConfig
    description = "SiD (Zhou et al. 2024): score identity distillation on the same three networks"
    recipes = {
        "2d": {"iters": 2000, "batch_size": 256, "lr": 3e-4},
        "image": {"iters": 1500, "batch_size": 128, "lr": 1e-4},
    }

    def generator_objective(self, nets, x, cond, ctx):
        return self.sid_loss(nets, x, cond, ctx)
