"""Flash by Adversarial Diffusion Distillation (ADD, arXiv 2311.17042, as the Kandinsky 3.0 Flash authors adapted it).

The **student** starts as a copy of the teacher U-Net and learns to give a clean latent in one pass from a real
latent noised at one of the Flash timesteps (979/729/479/229); its x0 is read from its ε as at inference. The
**discriminator** (``models/discriminator.py``) is the frozen down half of the teacher with one trainable,
text-attending head per level; it scores real and student latents re-noised to a discriminator timestep. Each step:

1. ``discriminator``: Wasserstein critic loss D(fake) − D(real) + λ_GP·(‖∇D(x̂)‖ − 1)² (WGAN-GP, x̂ between real
   and fake) — or ADD's hinge loss + R1 on real (``loss: hinge``);
2. ``generator`` (after the discriminator stepped): −D(fake) (non-saturating in the Wasserstein sense: its
   gradient does not vanish while the critic is ahead), plus an optional distillation term
   λ·ᾱ_s·‖x0_student − sg(x0_teacher(re-noised student sample, s))‖² (off by default: the authors found it did not
   matter).

The seed's choices are the defaults: Wasserstein + GP, no distillation, D lr 1e-3 vs G lr 1e-5, text
cross-attention in the heads. Each is a switch in ``model:`` or ``optimizers:`` (docs/flash.md has the ablations).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...checkpoints.loading import Components, parse_dtype, save_components
from ...diffusion import FLASH_TIMESTEPS, NoiseSchedule
from ...models.config import ConfigError
from ...models.discriminator import LatentDiscriminator
from ...models.seeding import drawing_from
from ...registry import SamplerDefaults
from ...world.dataset import world_sample
from ...world.judge import judge
from ..protocol import OptimizerSpec
from .base import Recipe, evaluating, image_grid, load_frozen
from .diffusion import SAMPLE_PROMPTS

LOSSES = ("wasserstein", "hinge")


@dataclass
class FlashADDParams:
    """``model:`` of the flash recipe."""

    teacher: str = "nano"  # the base model to distil: a registered name or a model folder
    name: str = "custom-flash"
    description: str = "distilled to 4 Flash steps with kandinsky3 train flash (ADD)"
    timesteps: tuple[int, ...] = FLASH_TIMESTEPS  # the student's input noise levels (the Flash sampler's)
    loss: str = "wasserstein"  # wasserstein (+ gradient penalty) | hinge (+ R1), ADD's
    gp_weight: float = 10.0  # λ of the WGAN-GP gradient penalty
    r1_weight: float = 1e-5  # γ of R1 with the hinge loss (γ/2 · ‖∇D(real)‖²)
    distillation_weight: float = 0.0  # λ of the distillation term (0: none, the seed's choice)
    distillation_guidance: float | None = None  # the teacher's guidance in that term (None: its default)
    d_timestep_range: tuple[int, int] = (0, 1000)  # the discriminator's re-noising t ~ U[lo, hi)
    head_width: int = 64  # channels of each discriminator head
    head_text_attention: bool = True  # heads attend to the text tokens (ablation: False)
    export_dtype: str | None = None  # e.g. fp16
    probe_captions: int = 40  # validation captions judged at every sample_every step (0: no probe)

    def validate(self, cfg):
        if self.loss not in LOSSES:
            raise ConfigError(f"model.loss must be one of {LOSSES}, got {self.loss!r}")
        if not self.timesteps or any(not 0 <= t < 1000 for t in self.timesteps):
            raise ConfigError(f"model.timesteps must be in [0, 1000), got {self.timesteps}")
        lo, hi = self.d_timestep_range
        if not 0 <= lo < hi <= 1000:
            raise ConfigError(f"model.d_timestep_range must satisfy 0 ≤ lo < hi ≤ 1000, got {self.d_timestep_range}")
        for name in ("gp_weight", "r1_weight", "distillation_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be ≥ 0, got {getattr(self, name)}")


def _twice_differentiable_attention():
    """The fused SDPA kernels (flash, memory-efficient) have no double backward; a penalty on ∇D needs one, so the
    critic's forward for it runs on the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """WGAN-GP: E[(‖∇_x̂ critic(x̂)‖₂ − 1)²] at x̂ = ε·real + (1 − ε)·fake, ε ~ U[0, 1) per sample; differentiable
    (``create_graph``) so the critic's parameters get its gradient."""
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, generator=generator)
    mixed = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    with _twice_differentiable_attention():
        (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def r1_penalty(critic, real: torch.Tensor) -> torch.Tensor:
    """R1: E[‖∇_x critic(x)‖²] on real samples."""
    real = real.detach().requires_grad_(True)
    with _twice_differentiable_attention():
        (grad,) = torch.autograd.grad(critic(real).sum(), real, create_graph=True)
    return grad.flatten(1).square().sum(1).mean()


class FlashADDRecipe(Recipe):
    Params = FlashADDParams
    losses: ClassVar[dict[str, str]] = {"discriminator": "discriminator", "generator": "student"}  # in this order
    ema_modules: ClassVar[tuple[str, ...]] = ("student",)

    def __init__(self, cfg, device, rng):
        super().__init__(cfg, device, rng)
        p = self.params
        teacher = load_frozen(p.teacher, device)
        self.teacher_variant, self.movq, self.text = teacher.variant, teacher.movq, teacher.text_encoder
        self.teacher = teacher.unet
        self.schedule = NoiseSchedule.named("cosine")
        student = copy.deepcopy(self.teacher).train().requires_grad_(True)
        with drawing_from(rng.cpu):
            discriminator = LatentDiscriminator(self.teacher, p.head_width, p.head_text_attention).to(device)
        self.modules = {"student": student, "discriminator": discriminator}
        if p.distillation_weight == 0:
            self.teacher = None  # not needed: keep the memory
        self.variant = replace(
            teacher.variant,
            name=p.name,
            description=p.description,
            sampler=SamplerDefaults(kind="flash", steps=len(p.timesteps), guidance=0.0, threshold_percentile=None),
            local_dir=None,
            beautifier=teacher.variant.beautifier,
        )

    def parameter_groups(self):
        return {
            "student": list(self.modules["student"].parameters()),
            "heads": self.modules["discriminator"].trainable_parameters(),
        }

    def optimizers(self):
        """The seed's learning rates: the critic 100× faster than the student (the student overpowers a slow
        critic). Override by name in the YAML: ``optimizers: {discriminator: {lr: 1.0e-5}}``."""
        return {
            "discriminator": OptimizerSpec(("heads",), lr=1e-3, betas=(0.0, 0.99), weight_decay=0.0),
            "student": OptimizerSpec(("student",), lr=1e-5, betas=(0.9, 0.99), weight_decay=self.cfg.weight_decay),
        }

    @torch.no_grad()
    def prepare(self, batch, ctx):
        ids, mask = self.text.tokenize(batch["caption"])
        context, mask = self.text.encode_ids(ids, mask)
        lengths = self.text.prompt_lengths(mask)
        latents = self.movq.encode(batch["image"].to(self.device)).float()
        return {"latents": latents, "context": context.float(), "mask": mask, "lengths": lengths}

    def _renoise(self, x0, t, generator):
        return self.schedule.q_sample(x0, t, torch.randn(x0.shape, device=x0.device, generator=generator))

    def step(self, modules, batch, ctx):
        p, g = self.params, ctx.generator(self.device)
        student, discriminator = modules["student"], modules["discriminator"]
        x0, context, mask, lengths = batch["latents"], batch["context"], batch["mask"], batch["lengths"]
        b = x0.shape[0]
        text = dict(context=context, context_mask=mask, context_lengths=lengths)

        choices = torch.tensor(p.timesteps, device=x0.device)
        t = choices[torch.randint(0, len(choices), (b,), device=x0.device, generator=g)]
        x_t = self._renoise(x0, t, g)
        fake = self.schedule.x0_from_eps(x_t, t, student(x_t, t.float(), **text).float())

        lo, hi = p.d_timestep_range
        s = torch.randint(lo, hi, (b,), device=x0.device, generator=g)
        real_s, noise_s = self._renoise(x0, s, g), torch.randn(x0.shape, device=x0.device, generator=g)

        def critic(x):
            return discriminator(x, s.float(), **text)

        fake_s = self.schedule.q_sample(fake.detach(), s, noise_s)
        score_real, score_fake = critic(real_s), critic(fake_s)
        ctx.record("critic_gap", score_real.mean() - score_fake.mean())  # how far ahead the critic is
        if p.loss == "wasserstein":
            d_loss = score_fake.mean() - score_real.mean()
            if p.gp_weight:
                penalty = gradient_penalty(critic, real_s, fake_s, g)
                ctx.record("gradient_penalty", penalty)
                d_loss = d_loss + p.gp_weight * penalty
        else:
            d_loss = F.relu(1 - score_real).mean() + F.relu(1 + score_fake).mean()
            if p.r1_weight:
                penalty = r1_penalty(critic, real_s)
                ctx.record("r1_penalty", penalty)
                d_loss = d_loss + p.r1_weight / 2 * penalty
        yield "discriminator", d_loss

        g_loss = -critic(self.schedule.q_sample(fake, s, noise_s)).mean()  # the critic has just stepped
        if p.distillation_weight:
            g_loss = g_loss + p.distillation_weight * self._distillation(fake, s, text, g)
        yield "generator", g_loss

    def _distillation(self, fake, s, text, generator):
        """ᾱ_s-weighted MSE between the student's x0 and the teacher's x0 of it re-noised at s (teacher guided)."""
        w = self.params.distillation_guidance
        w = self.teacher_variant.sampler.guidance if w is None else w
        with torch.no_grad():
            x_s = self._renoise(fake.detach(), s, generator)
            eps = self.teacher(x_s, s.float(), **text).float()
            if w:
                null, null_mask = self.text.null_context(text["context"])
                uncond = self.teacher(x_s, s.float(), null, null_mask, None, text["context_lengths"]).float()
                eps = (w + 1) * eps - w * uncond
            target = self.schedule.x0_from_eps(x_s, s, eps)
        weight = self.schedule.abar(s, fake)
        return (weight * (fake - target).square()).mean()

    def enable_gradient_checkpointing(self):
        self.modules["student"].gradient_checkpointing = True

    def pipeline(self, student):
        from ...pipeline import Kandinsky3

        return Kandinsky3(Components(self.variant, student, self.movq, self.text), device=self.device)

    @torch.no_grad()
    def sample_grid(self, modules):
        """Rows: the Flash sampler at 1, 2 and 4 steps (same seeds)."""
        with evaluating(modules["student"]) as student:
            pipe = self.pipeline(student)
            steps = (1, 2, len(FLASH_TIMESTEPS))
            rows = [pipe.generate(SAMPLE_PROMPTS, seed=0, steps=n, progress=False) for n in steps]
        return image_grid(rows)

    @torch.no_grad()
    def probe(self, modules):
        """Judge-read alignment of the student's Flash samples at 4 and 2 steps on ``probe_captions`` fixed
        validation captions (half one object, half two): the curve beside the losses in docs/flash.md."""
        n = self.params.probe_captions
        if not n:
            return None
        samples = [world_sample(i, "val", num_objects=1 + i % 2, complete_caption=True) for i in range(n)]
        result = {}
        with evaluating(modules["student"]) as student:
            pipe = self.pipeline(student)
            for steps in (len(FLASH_TIMESTEPS), 2):
                images = pipe.generate([s.caption for s in samples], seed=0, steps=steps, progress=False)
                for objects in (1, 2):
                    verdicts = [
                        judge(im, s.caption).aligned
                        for i, (s, im) in enumerate(zip(samples, images))
                        if i % 2 == objects - 1
                    ]
                    result[f"alignment_{objects}obj_{steps}steps"] = sum(verdicts) / len(verdicts)
        return result

    def export(self, modules, path):
        student = modules["student"].eval()
        dtype = parse_dtype(self.params.export_dtype, None)
        save_components(Components(self.variant, student, self.movq, self.text), Path(path), "native", dtype)


__all__ = ["FlashADDParams", "FlashADDRecipe", "gradient_penalty", "r1_penalty"]
