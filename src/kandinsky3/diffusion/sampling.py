"""Samplers, one signature: ``sample_*(denoiser, x, schedule, timesteps, generator, progress) → x0 latents``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .schedule import NoiseSchedule, dynamic_threshold

FLASH_TIMESTEPS = (979, 729, 479, 229)
Denoise = Callable[[torch.Tensor, int], torch.Tensor]


def official_timesteps(steps: int, num_timesteps: int = 1000) -> list[int]:
    """``range(T−1, 0, −(T // steps)) + [0]``: 50 steps → 999, 979, …, 19, 0 (spec §4.2)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    return list(range(num_timesteps - 1, 0, -(num_timesteps // steps))) + [0]


def flash_timesteps(steps: int = 4) -> list[int]:
    """``range(979, 0, −(1000 // steps))``: 4 steps → [979, 729, 479, 229], the released Flash schedule."""
    if not 1 <= steps <= 979:
        raise ValueError(f"Flash steps must be between 1 and 979, got {steps}")
    return list(range(979, 0, -(1000 // steps)))


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise drawn on the generator's device (so a CPU seed gives the same image on any device)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)


def _steps(pairs, progress):
    if progress is None or progress is False:
        return pairs
    from tqdm.auto import tqdm

    return tqdm(pairs, desc="denoising", leave=False, disable=progress is False)


@torch.no_grad()
def sample_ddim(denoise: Denoise, x: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int],
                generator: torch.Generator | None = None, eta: float = 1.0, threshold_percentile: float | None = 0.99,
                progress=None) -> torch.Tensor:
    """The official K3 sampler: DDIM with η multiplying the variance, and dynamic thresholding of x0.

    ``timesteps`` runs from the start step down to 0 (inclusive); ``x`` is x at ``timesteps[0]``.
    """
    x = x.float()
    pairs = list(zip(timesteps[:-1], timesteps[1:]))
    for t, t_prev in _steps(pairs, progress):
        eps = denoise(x, t)
        x0 = schedule.x0_from_eps(x, t, eps)
        if threshold_percentile is not None:
            x0 = dynamic_threshold(x0, threshold_percentile)
            eps = schedule.eps_from_x0(x, t, x0)
        a_t, a_prev = schedule.abar(t, x), schedule.abar(t_prev, x)
        variance = eta * (1 - a_t / a_prev) * (1 - a_prev) / (1 - a_t)
        mean = a_prev.sqrt() * x0 + (1 - a_prev - variance).clamp(min=0).sqrt() * eps
        x = mean + variance.sqrt() * randn_like(x, generator) if t_prev != 0 else mean
    return x


@torch.no_grad()
def sample_flash(denoise: Denoise, x: torch.Tensor, schedule: NoiseSchedule,
                 timesteps: Sequence[int] = FLASH_TIMESTEPS, generator: torch.Generator | None = None,
                 progress=None) -> torch.Tensor:
    """Kandinsky 3.1 Flash: at each t re-noise the current x0 estimate with fresh noise, predict, take x0."""
    img = x.float()
    for t in _steps(list(timesteps), progress):
        x_t = schedule.q_sample(img, t, randn_like(img, generator))
        img = schedule.x0_from_eps(x_t, t, denoise(x_t, t))
    return img


@torch.no_grad()
def sample_with_scheduler(denoise: Denoise, x: torch.Tensor, scheduler, steps: int,
                          generator: torch.Generator | None = None, strength: float = 1.0, progress=None,
                          x0: torch.Tensor | None = None) -> torch.Tensor:
    """Any diffusers ε-prediction scheduler as an alternative sampler (x is unit noise).

    With ``x0`` and ``strength`` < 1 it starts part-way (image→image), as diffusers' img2img does.
    """
    scheduler.set_timesteps(steps, device=x.device)
    timesteps = scheduler.timesteps
    if x0 is not None:
        keep = max(1, int(steps * strength))
        timesteps = timesteps[len(timesteps) - keep:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(len(scheduler.timesteps) - keep)
        x = scheduler.add_noise(x0.float(), x.float(), timesteps[:1])
    else:
        x = x.float() * scheduler.init_noise_sigma
    for t in _steps(list(timesteps), progress):
        eps = denoise(scheduler.scale_model_input(x, t), int(t))
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x
