"""Diffusion maths on tensors: schedules, samplers, guidance. Knows nothing about files."""

from .conditioning import Adapter, Conditioning, Denoiser, ExtraChannels, ImageCondition
from .sampling import (
    FLASH_TIMESTEPS,
    SAMPLERS,
    GenerationCancelled,
    NoiseSource,
    Sampler,
    SamplerRun,
    flash_timesteps,
    official_timesteps,
    sample_ddim,
    sample_flash,
    sample_with_scheduler,
)
from .schedule import NoiseSchedule, dynamic_threshold
from .tiling import MultiDiffusion

__all__ = [
    "Adapter",
    "Conditioning",
    "Denoiser",
    "ExtraChannels",
    "FLASH_TIMESTEPS",
    "GenerationCancelled",
    "ImageCondition",
    "MultiDiffusion",
    "NoiseSchedule",
    "NoiseSource",
    "SAMPLERS",
    "Sampler",
    "SamplerRun",
    "dynamic_threshold",
    "flash_timesteps",
    "official_timesteps",
    "sample_ddim",
    "sample_flash",
    "sample_with_scheduler",
]
