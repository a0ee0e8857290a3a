"""Trajectory distribution matching (TDM; Luo et al. 2025): a K-step deterministic student whose whole
sampling path, not only its output, matches the teacher's marginals.

Each iteration rolls the student's own path under no_grad (x0 = G(x_{t_i}), DDIM re-noise with the
predicted eps) and picks a step k per sample. From x0_s = G(x_{t_k}) the state is re-noised
deterministically to the interval's lower end t_mid (t_{k+1}, or clean data after the last step), then
diffused with fresh noise z to a random t in (t_mid, t_k):
    x_t = (alpha_t / alpha_mid) x_mid + beta z,   beta^2 = sigma_t^2 - (alpha_t sigma_mid / alpha_mid)^2.
Fake score: x0 regression onto sg(x0_s), weighted by min(SNR(t), 5) and the importance weight of the mixed
noise, exp(-|m|^2 / 2D) / exp(-|z|^2 / 2D) with m the effective noise of x_t (or, as an option, exact denoising
score matching on the fresh-noise kernel). Generator: pseudo-Huber between x0_s and
sg(x0_s + x0_teacher_cfg(w) - x0_fake), divided by mean|x0_s - x0_teacher_cfg|. TTUR by learning-rate ratio
(critic 5x), Adam betas (0, 0.95).

Sampling-steps-aware (the paper's TDM-unify): every sample draws its step count K' in 1..K, trains on the
grid of K' (whose last interval reaches clean data) and both the student and the fake score take K' as an
input (a zero-initialised step-count embedding, so both start as the teacher); one student then samples with
1 to K deterministic steps, each on its own saved time list, told the step count by the sampler engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fewstep.diffusion.processes import expand_like
from fewstep.errors import FewstepError, check_choice
from fewstep.methods.base import Batch, Role, StepContext
from fewstep.methods.fake_score import FakeScoreConfig, FakeScoreMethod
from fewstep.methods.registry import register_method
from fewstep.models.denoiser import select_conds
from fewstep.sampling.rollout import rollout

INTERVALS = ("step", "max")
FAKE_TARGETS = ("x0", "state")


@dataclass
class TDMConfig(FakeScoreConfig):
    steps: int = 4
    fake_lr_scale: float = 5.0  # TTUR by learning-rate ratio: generator lr = critic lr / 5
    student_beta1: float = 0.0
    critic_beta1: float = 0.0
    beta2: float = 0.95
    steps_aware: bool = True  # train the grids of every step count 1..K (one student serves 1 to K steps)
    # with steps_aware: student and fake score take the step count as an input (TDM-unify). None: wherever the
    # network family has that input (the built-in mlp and unet); diffusers networks go without, since stock
    # pipelines could not pass it to an exported student
    steps_embed: bool | None = None
    # how often each step count 1..K is trained when steps_aware: "uniform", "linear" (in proportion to the count,
    # so every (step count, step) pair is seen equally often), "full:W" (the K-step grid W times as often as each
    # smaller count, whatever K) or K non-negative numbers
    step_weights: str | list[float] = "uniform"
    random_mid: bool = False  # draw the interval's lower end in [t_{k+1}, t_k) (TDM's randmid regulariser)
    interval: str = "step"  # fresh-noise time in (t_mid, t_k) ("step") or (t_mid, t_max) ("max")
    snr_cap: float = 5.0  # fake-score weight min(SNR(t), snr_cap)
    importance_weight: bool = True  # weight the fake score's loss by the mixed noise's importance weight
    huber_c: float = 1e-3  # generator's pseudo-Huber c (per element): linear beyond |x0_s - target| >> c
    margin: float = 0.01  # keep noise times this far (fraction of the time range) inside the interval
    # x0 (TDM: x0 regression, min-SNR and importance weights) | state (exact DSM on the fresh-noise kernel,
    # unbiased on intermediate steps: see fake_score_loss)
    fake_target: str = "x0"


@register_method("tdm")
class TDM(FakeScoreMethod):
    config_class = TDMConfig
    description = ("TDM (Luo et al. 2025): trajectory distribution matching of a deterministic K-step student "
                   "(default 4), sampling-steps-aware (1..K, step count as an input), TTUR by learning-rate ratio")
    # fresh noise up to the top of the time range (interval=max) and pseudo-Huber c=0.03 (the paper's 1e-3 is per
    # element on SD latents; on these small teachers it turns the update into a sign and stalls them); digits trains
    # the step counts in proportion to their steps (linear), so every (step count, step) is seen equally often.
    # 2-D: the unbiased fake-score target, the 4-step grid 9x as often as each smaller count, two critic updates
    # per generator update (3000 generator updates) and a large batch with cosine decay; the 4-step checkerboard
    # student then scores like the teacher's 50 steps (docs/results.md)
    recipes = {
        "2d": {"iters": 6000, "batch_size": 2048, "lr": 1e-4, "lr_schedule": "cosine",
               "options": {"interval": "max", "huber_c": 0.03, "fake_target": "state", "step_weights": "full:9",
                           "update_ratio": 2}},
        "image": {"iters": 2000, "batch_size": 128, "lr": 5e-5,
                  "options": {"interval": "max", "huber_c": 0.03, "step_weights": "linear"}},
    }

    def __init__(self, teacher, config=None, *, guidance: float = 1.0):
        super().__init__(teacher, config, guidance=guidance)
        c = self.config
        check_choice("interval", c.interval, INTERVALS)
        check_choice("fake_target", c.fake_target, FAKE_TARGETS)
        if c.timesteps is not None and c.steps_aware:
            raise FewstepError("explicit timesteps fix the step count: set steps_aware=false with them")
        if not 0.0 <= c.margin < 0.5 or c.huber_c <= 0 or c.snr_cap <= 0:
            raise FewstepError(f"need 0 <= margin < 0.5, huber_c > 0 and snr_cap > 0, got {c.margin}, {c.huber_c}, "
                               f"{c.snr_cap}")
        k = len(self.gen_times)
        self.grids = {k: self.gen_times}
        if c.steps_aware:
            self.grids.update({j: self.step_times(j) for j in range(1, k)})
        self.counts = sorted(self.grids)
        weights = c.step_weights
        if weights is None or weights == "uniform":
            probs = torch.ones(len(self.counts), dtype=torch.float64)
        elif weights == "linear":
            probs = torch.as_tensor(self.counts, dtype=torch.float64)
        elif isinstance(weights, str) and weights.startswith("full:"):
            try:
                full = float(weights[len("full:"):])
            except ValueError:
                full = -1.0
            if not (math.isfinite(full) and full > 0):
                raise FewstepError(f"step_weights full:W needs a positive number W, got {weights!r}")
            probs = torch.ones(len(self.counts), dtype=torch.float64)
            probs[-1] = full
        elif isinstance(weights, str):
            raise FewstepError(f"step_weights is uniform, linear, full:W or a list of numbers, got {weights!r}")
        else:
            probs = torch.as_tensor([float(w) for w in weights], dtype=torch.float64)
            if len(probs) != len(self.counts) or bool(torch.any(probs < 0)) or float(probs.sum()) <= 0:
                raise FewstepError(f"step_weights needs {len(self.counts)} non-negative numbers (step counts "
                                   f"{self.counts}) with a positive sum, got {weights}")
        self.count_cdf = torch.cumsum(probs / probs.sum(), 0)
        embeddable = hasattr(teacher.net, "config") and not hasattr(teacher.net, "derive")
        wanted = embeddable if c.steps_embed is None else bool(c.steps_embed)
        self.embed_steps = bool(c.steps_aware and wanted and len(self.counts) > 1)
        if self.embed_steps and not embeddable:
            raise FewstepError("steps_embed needs a built-in network family (mlp, unet) to add the step-count input; "
                               "set steps_embed=false")
        # (len(counts), K + 1) time table: row j is the grid of counts[j] then the process' clean end, padded
        table = torch.full((len(self.counts), k + 1), float(teacher.process.t_min), dtype=torch.float64)
        for j, n in enumerate(self.counts):
            table[j, :n] = self.grids[n]
        self.time_table = table

    def networks(self) -> dict[str, Role]:
        c = self.config
        # the paper's TDM-unify: the step count goes into the student and the fake score (zero-initialised)
        extra = {"steps_embed": True} if self.embed_steps else {}
        return {
            "teacher": Role(self.teacher),
            "student": Role(self.student_from_teacher(**extra), trainable=True, betas=(c.student_beta1, c.beta2)),
            "fake_score": Role(self.student_from_teacher(**extra), trainable=True, lr_scale=c.fake_lr_scale,
                               betas=(c.critic_beta1, c.beta2)),
        }

    def student_meta(self) -> dict:
        k = len(self.gen_times)
        return {"default_solver": "fewstep", "default_steps": k, "default_renoise": "deterministic",
                "timesteps": {str(j): [float(t) for t in ts] for j, ts in sorted(self.grids.items())}}

    # -- the trajectory ---------------------------------------------------------------------------------
    def trajectory_point(self, student, batch: Batch, ctx: StepContext):
        """(x_{t_k}, t_k, t_low, n): a state of the student's own deterministic path on the grid of each sample's
        step count n (drawn per sample from `step_weights` when steps_aware), the step k drawn uniformly per
        sample; t_low is the next grid time (the process' clean end after the last). n is None when the student
        does not take the step count as an input."""
        proc, b = self.teacher.process, batch.size
        shape = (b, *self.teacher.data_shape)
        row = torch.zeros(b, dtype=torch.long)
        if len(self.counts) > 1:
            row = torch.searchsorted(self.count_cdf, ctx.rand(b), right=True).clamp(max=len(self.counts) - 1)
        n = torch.as_tensor(self.counts, dtype=torch.long)[row]
        grid = self.time_table[row]  # (b, K + 1)
        noise = ctx.randn(shape)
        noise = noise * self._col(proc.prior_std(grid[:, 0]), noise)
        k = (ctx.rand(b) * n).long().clamp(max=n - 1)
        steps = n.to(ctx.device) if self.embed_steps else None

        def model(x, t, rows):
            return student(x, t.to(ctx.device, torch.float32), select_conds(batch.cond, rows),
                           steps=None if steps is None else steps[rows]).float()

        with torch.no_grad():  # step j moves only the samples whose step k is still ahead
            x = rollout(proc, model, noise, grid, renoise="deterministic", stop=k).x
        idx = torch.arange(b)
        return x, grid[idx, k], grid[idx, k + 1], steps

    @staticmethod
    def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return expand_like(v.float().to(like.device), like)

    def diffuse(self, x0_s: torch.Tensor, x_k: torch.Tensor, t_k: torch.Tensor, t_low: torch.Tensor,
                ctx: StepContext) -> dict:
        """Re-noise x0_s deterministically to t_mid, then diffuse with fresh noise to t in (t_mid, t_k).

        Returns x_t, t (float32, on the device), the importance weight of the mixed noise, and for the
        "state" fake-score target the student's next state x_mid and the kernel's r = alpha_t / alpha_mid, beta.
        """
        c, proc = self.config, self.teacher.process
        b = x0_s.shape[0]
        span = proc.t_max - proc.t_min
        eps = c.margin * span
        t_k, t_low = t_k.double(), t_low.double()
        t_mid = t_low
        if c.random_mid:
            t_mid = t_low + (t_k - eps - t_low).clamp_min(0) * ctx.rand(b)
        hi = t_k - eps if c.interval == "step" else torch.full_like(t_k, proc.t_max - eps)
        lo = torch.maximum(t_mid, torch.full_like(t_mid, proc.t_min + eps))
        lo = torch.minimum(lo, hi)
        t = lo + (hi - lo) * ctx.rand(b)
        a_k, s_k = proc.alpha(t_k), proc.sigma(t_k)
        a_m, s_m = proc.alpha(t_mid), proc.sigma(t_mid)
        a_t, s_t = proc.alpha(t), proc.sigma(t)
        x0 = x0_s.detach().float()

        def col(v):
            return self._col(v, x0)

        eps_s = (x_k.float() - col(a_k) * x0) / col(s_k)
        x_mid = col(a_m) * x0 + col(s_m) * eps_s
        ratio = a_t / a_m
        beta = (s_t ** 2 - (ratio * s_m) ** 2).clamp_min(0).sqrt()
        z = ctx.randn(x0.shape)
        x_t = col(ratio) * x_mid + col(beta) * z
        weight = torch.ones(b, device=ctx.device)
        if c.importance_weight and c.fake_target == "x0":
            mixed = (col(ratio * s_m) * eps_s + col(beta) * z) / col(s_t)
            log_w = -0.5 * mixed.pow(2).flatten(1).mean(1) + 0.5 * z.pow(2).flatten(1).mean(1)
            weight = torch.exp(log_w)
        return {"x_t": x_t, "t": t.to(ctx.device, torch.float32), "weight": weight, "x_mid": x_mid,
                "ratio": ratio, "beta": beta, "alpha_t": a_t, "sigma_t": s_t}

    def fake_score_loss(self, fake_x0: torch.Tensor, x0_s: torch.Tensor, d: dict) -> torch.Tensor:
        """Per-sample fake-score loss.

        "x0" (TDM): min(SNR(t), cap) * w * mean (x0_fake - x0_s)^2, with w the mixed-noise importance weight.
        "state": denoising score matching on the fresh-noise kernel x_t = r x_mid + beta z, which is exact
        whatever the coupling between x0_s and the student's noise: the fake's x0 is read as a score,
        (alpha_t x0_fake - x_t) / sigma_t^2, and regressed onto the kernel's (r x_mid - x_t) / beta^2 in
        next-state units, x_mid_fake = (x_t + beta^2 (alpha_t x0_fake - x_t) / sigma_t^2) / r, with weight
        min(r^2 / beta^2, cap). After the last step (t_mid clean) both are the same loss (without w).

        On an intermediate step the "x0" target is biased: the student's re-noise couples x0_s and its noise,
        and E[x0_s | x_t] read as a score makes the fake look narrower than the student's states (a 1-D Gaussian
        first step: 4.7% too steep at t = 0.8), so the generator spreads them too far. On the checkerboard,
        training step 0 alone reaches its next state's marginal with "state" (sliced Wasserstein 0.023, floor
        0.019) and misses it with "x0" (0.055, where the teacher's own Euler step is 0.054).
        """
        c = self.config
        if c.fake_target == "x0":
            return (fake_x0 - x0_s).pow(2).flatten(1).mean(1) * self.snr_weight(d["t"]) * d["weight"]
        x_t = d["x_t"]

        def col(v):
            return self._col(v, x_t)

        score_units = col(d["beta"] ** 2 / d["sigma_t"] ** 2)
        mid_fake = (x_t + score_units * (col(d["alpha_t"]) * fake_x0 - x_t)) / col(d["ratio"])
        snr_kernel = (d["ratio"] ** 2 / d["beta"].clamp_min(1e-12) ** 2).clamp(max=c.snr_cap)
        return (mid_fake - d["x_mid"]).pow(2).flatten(1).mean(1) * snr_kernel.float().to(x_t.device)

    def snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """min(SNR(t), snr_cap) with SNR = alpha^2 / sigma^2."""
        r = self.teacher.process.ratio(t.double())
        return (1.0 / (r * r)).clamp(max=self.config.snr_cap).float().to(t.device)

    # -- the loss of each phase ---------------------------------------------------------------------------
    def loss(self, phase, batch, nets, ctx):
        c = self.config
        if phase == "critic":
            with torch.no_grad():
                x_k, t_k, t_low, steps = self.trajectory_point(nets["student"], batch, ctx)
                x0_s = nets["student"](x_k, t_k.to(ctx.device, torch.float32), batch.cond, steps=steps).float()
                d = self.diffuse(x0_s, x_k, t_k, t_low, ctx)
            fake = nets["fake_score"](d["x_t"], d["t"], batch.cond, steps=steps).float()
            loss = self.fake_score_loss(fake, x0_s, d).mean()
            return {"loss": loss, "fake": loss.detach(), "is_weight": d["weight"].mean()}
        x_k, t_k, t_low, steps = self.trajectory_point(nets["student"], batch, ctx)
        x0_s = nets["student"](x_k, t_k.to(ctx.device, torch.float32), batch.cond, steps=steps).float()
        d = self.diffuse(x0_s, x_k, t_k, t_low, ctx)
        x_t, t = d["x_t"], d["t"]
        gap, real = self.real_minus_fake(nets, x_t, t, batch.cond, steps=steps)  # x0_teacher_cfg - x0_fake
        target = (x0_s.detach() + gap).detach()
        huber = torch.sqrt((x0_s - target).pow(2) + c.huber_c ** 2) - c.huber_c
        if c.normalize:
            huber = huber / expand_like(self.normaliser(x0_s, real), huber)
        loss = huber.mean()
        return {"loss": loss, "gap": gap.pow(2).flatten(1).sum(1).sqrt().mean()}
