"""Samplers and the sampler table.

Each sampler is a plain function ``sample_*(denoise, x, schedule, timesteps, noise, …, callback) → latents``; the
table :data:`SAMPLERS` maps a name to a :class:`Sampler` entry that also says where a partial (image→image) run
starts and whether the sampler takes classifier-free guidance. Adding a sampler is one entry (docs/architecture.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .schedule import NoiseSchedule, dynamic_threshold

FLASH_TIMESTEPS = (979, 729, 479, 229)
Denoise = Callable[[torch.Tensor, int], torch.Tensor]


def official_stride(steps: int, num_timesteps: int = 1000) -> int:
    """The official ``-1000 // steps``, which Python reads as ``(-1000) // steps``: the stride is ceil(T / steps).

    For steps that divide T it is T / steps; otherwise one more (30 steps → 34, not 33), so a run makes at most
    ``steps`` U-Net calls (spec §4.2)."""
    return -((-num_timesteps) // steps)


def official_timesteps(steps: int, num_timesteps: int = 1000) -> list[int]:
    """``range(T−1, 0, (−T) // steps) + [0]``: 50 steps → 999, 979, …, 19, 0; 30 → 999, 965, …, 13, 0 (spec §4.2)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    return list(range(num_timesteps - 1, 0, -official_stride(steps, num_timesteps))) + [0]


def flash_timesteps(steps: int = 4) -> list[int]:
    """``range(979, 0, (−1000) // steps)``: 4 steps → [979, 729, 479, 229], the released Flash schedule (the
    official code fixes the stride at 250; other step counts follow the base sampler's ceil rule)."""
    if not 1 <= steps <= 979:
        raise ValueError(f"Flash steps must be between 1 and 979, got {steps}")
    return list(range(979, 0, -official_stride(steps)))


class GenerationCancelled(RuntimeError):
    """A step callback returned False: the run stopped before its last step."""


StepCallback = Callable[[int, int, torch.Tensor], "bool | None"]


class NoiseSource:
    """Where a run's random draws come from: one generator for the whole batch, or one per sample.

    With one generator per sample (per-sample seeds) sample k's noise depends only on its own seed, so image k
    of a batch can be regenerated alone. Draws are made on the generators' device (a CPU seed gives the same
    image on any device) and moved to the tensor's device.
    """

    def __init__(self, generators: "torch.Generator | Sequence[torch.Generator] | None" = None):
        self.per_sample = isinstance(generators, (list, tuple))
        self.generators = list(generators) if self.per_sample else generators

    @classmethod
    def from_seed(cls, seed: "int | Sequence[int]", device="cpu") -> "NoiseSource":
        if isinstance(seed, (list, tuple)):
            return cls([torch.Generator(device).manual_seed(s) for s in seed])
        return cls(torch.Generator(device).manual_seed(seed))

    @classmethod
    def of(cls, source) -> "NoiseSource":
        return source if isinstance(source, NoiseSource) else cls(source)

    @property
    def generator(self):
        """What diffusers' schedulers take: one generator or a list, one per sample."""
        return self.generators

    def randn(self, shape, device=None) -> torch.Tensor:
        """Unit Gaussian noise of ``shape`` (fp32)."""
        if self.per_sample:
            if shape[0] != len(self.generators):
                raise ValueError(f"{len(self.generators)} seeds for a batch of {shape[0]}: give one seed per image")
            parts = [
                torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in self.generators
            ]
            out = torch.cat(parts)
        else:
            g = self.generators
            out = torch.randn(shape, generator=g, device=g.device if g is not None else device, dtype=torch.float32)
        # non_blocking: the CPU generator's noise is staged and copied without waiting for the queued kernels
        return out if device is None else out.to(device, non_blocking=True)


def randn_like(x: torch.Tensor, noise) -> torch.Tensor:
    """Noise like ``x`` from a :class:`NoiseSource` or a generator (None: the global RNG on x's device)."""
    return NoiseSource.of(noise).randn(x.shape, x.device)


def _steps(items, progress):
    if progress is None or progress is False:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="denoising", leave=False, disable=progress is False)


def _report(callback: StepCallback | None, step: int, t, x: torch.Tensor):
    if callback is not None and callback(step, int(t), x) is False:
        raise GenerationCancelled(f"stopped by the step callback after step {step + 1}")


@torch.no_grad()
def sample_ddim(
    denoise: Denoise,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    noise=None,
    eta: float = 1.0,
    threshold_percentile: float | None = 0.99,
    progress=None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """The official K3 sampler: DDIM with η multiplying the variance, and dynamic thresholding of x0.

    ``timesteps`` runs from the start step down to 0 (inclusive); ``x`` is x at ``timesteps[0]``; ``noise`` a
    :class:`NoiseSource` or a generator.
    """
    x = x.float()
    pairs = list(zip(timesteps[:-1], timesteps[1:]))
    for step, (t, t_prev) in enumerate(_steps(pairs, progress)):
        eps = denoise(x, t)
        x0 = schedule.x0_from_eps(x, t, eps)
        if threshold_percentile is not None:
            x0 = dynamic_threshold(x0, threshold_percentile)
            eps = schedule.eps_from_x0(x, t, x0)
        a_t, a_prev = schedule.abar(t, x), schedule.abar(t_prev, x)
        variance = eta * (1 - a_t / a_prev) * (1 - a_prev) / (1 - a_t)
        mean = a_prev.sqrt() * x0 + (1 - a_prev - variance).clamp(min=0).sqrt() * eps
        x = mean + variance.sqrt() * randn_like(x, noise) if t_prev != 0 else mean
        _report(callback, step, t, x)
    return x


@torch.no_grad()
def sample_flash(
    denoise: Denoise,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int] = FLASH_TIMESTEPS,
    noise=None,
    progress=None,
    callback: StepCallback | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Kandinsky 3.1 Flash: at each t re-noise the current x0 estimate with fresh noise, predict, take x0.

    ``prediction_type="sample"``: the denoiser predicts x0 itself (KandiSuperRes Flash)."""
    if prediction_type not in ("epsilon", "sample"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'sample', got {prediction_type!r}")
    img = x.float()
    for step, t in enumerate(_steps(list(timesteps), progress)):
        x_t = schedule.q_sample(img, t, randn_like(img, noise))
        out = denoise(x_t, t)
        img = out if prediction_type == "sample" else schedule.x0_from_eps(x_t, t, out)
        _report(callback, step, t, img)
    return img


@torch.no_grad()
def sample_with_scheduler(
    denoise: Denoise,
    x: torch.Tensor,
    scheduler,
    steps: int,
    noise=None,
    strength: float = 1.0,
    progress=None,
    x0: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Any diffusers scheduler as a sampler (x is unit noise); the denoiser predicts what the scheduler's
    ``prediction_type`` says (ε for the K3 U-Nets, x0 for KandiSuperRes).

    With ``x0`` and ``strength`` < 1 it starts part-way (image→image), as diffusers' img2img does.
    """
    scheduler.set_timesteps(steps, device=x.device)
    timesteps = scheduler.timesteps
    if x0 is not None:
        keep = partial_steps(steps, strength)
        timesteps = timesteps[len(timesteps) - keep :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(len(scheduler.timesteps) - keep)
        x = scheduler.add_noise(x0.float(), x.float(), timesteps[:1])
    else:
        x = x.float() * scheduler.init_noise_sigma
    generator = NoiseSource.of(noise).generator
    ints = [int(t) for t in timesteps.tolist()]  # one device read, not one per step
    for step, t in enumerate(_steps(list(timesteps), progress)):
        eps = denoise(scheduler.scale_model_input(x, t), ints[step])
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
        _report(callback, step, ints[step], x)
    return x


def partial_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` an image→image run at ``strength`` makes (the official and diffusers rule)."""
    return max(1, int(steps * strength))


# -- the sampler table ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerRun:
    """What one run of a sampler needs besides the denoiser and the starting noise."""

    schedule: NoiseSchedule
    steps: int
    noise: NoiseSource
    eta: float = 1.0
    threshold_percentile: float | None = None
    x0: torch.Tensor | None = None  # image→image: the clean latent to start from, and how much of the run to make
    strength: float = 1.0
    callback: StepCallback | None = None
    progress: object = None


@dataclass(frozen=True)
class Sampler:
    """One entry of :data:`SAMPLERS`: ``sample(denoise, x, run) → latents`` (``x`` is unit noise), whether it takes
    classifier-free guidance, its step count when a variant's default sampler is another kind, and which of the
    settings only some samplers use it reads."""

    sample: Callable[[Denoise, torch.Tensor, SamplerRun], torch.Tensor]
    guided: bool = True
    default_steps: int = 50
    reads: frozenset[str] = frozenset()


def _run_k3(denoise, x, run: SamplerRun):
    timesteps = official_timesteps(run.steps, run.schedule.num_timesteps)
    if run.x0 is not None:
        timesteps = timesteps[-(partial_steps(run.steps, run.strength) + 1) :]
        x = run.schedule.q_sample(run.x0, timesteps[0], x)
    return sample_ddim(
        denoise, x, run.schedule, timesteps, run.noise, run.eta, run.threshold_percentile, run.progress, run.callback
    )


def _run_flash(denoise, x, run: SamplerRun):
    timesteps = flash_timesteps(run.steps)
    if run.x0 is not None:  # start from the image itself: the sampler re-noises it to the first kept t
        timesteps = [t for t in timesteps if t < run.strength * 1000] or [timesteps[-1]]
        x = run.x0
    return sample_flash(denoise, x, run.schedule, timesteps, run.noise, run.progress, run.callback)


def diffusers_scheduler(class_name: str):
    """A diffusers scheduler on the K3 cosine schedule (ε-prediction; DDPM/DDIM on trailing timesteps)."""
    import diffusers

    kwargs = dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000, prediction_type="epsilon")
    if class_name in ("DDPMScheduler", "DDIMScheduler"):
        kwargs.update(clip_sample=False, timestep_spacing="trailing")
    return getattr(diffusers, class_name)(**kwargs)


def _run_diffusers(class_name: str, denoise, x, run: SamplerRun):
    return sample_with_scheduler(
        denoise,
        x,
        diffusers_scheduler(class_name),
        run.steps,
        run.noise,
        run.strength,
        run.progress,
        run.x0,
        run.callback,
    )


SAMPLERS: dict[str, Sampler] = {
    "k3": Sampler(_run_k3, reads=frozenset({"eta", "threshold_percentile"})),  # official DDIM-η, thresholding
    "flash": Sampler(_run_flash, guided=False, default_steps=len(FLASH_TIMESTEPS)),
    "ddpm": Sampler(functools.partial(_run_diffusers, "DDPMScheduler")),
    "ddim": Sampler(functools.partial(_run_diffusers, "DDIMScheduler")),
    "dpm++": Sampler(functools.partial(_run_diffusers, "DPMSolverMultistepScheduler")),
    "euler": Sampler(functools.partial(_run_diffusers, "EulerDiscreteScheduler")),
}
