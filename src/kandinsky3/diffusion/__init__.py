"""Diffusion maths on tensors: schedules, samplers, guidance. Knows nothing about files."""

from .conditioning import Conditioning, Denoiser
from .sampling import FLASH_TIMESTEPS, flash_timesteps, official_timesteps, sample_ddim, sample_flash, sample_with_scheduler
from .schedule import NoiseSchedule, dynamic_threshold

__all__ = [
    "Conditioning", "Denoiser", "FLASH_TIMESTEPS", "flash_timesteps", "NoiseSchedule", "dynamic_threshold", "official_timesteps",
    "sample_ddim", "sample_flash", "sample_with_scheduler",
]
