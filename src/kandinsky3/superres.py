"""``SuperRes``: KandiSuperRes pixel-diffusion upscaling (spec §7), standard and Flash modes.

Both modes are the shared sampler functions over a wrapped U-Net (``Denoiser`` with the low-res image as an
``ImageCondition``), with no loop of their own.
Standard: x0-prediction, ``DPMSolverMultistepScheduler`` (linear betas, ``prediction_type="sample"``), 5 steps,
run by ``sample_with_scheduler`` over a ``MultiDiffusion`` canvas of 1024-px windows with stride 800; view
predictions averaged uniformly (official, ``blend="uniform"``) or faded out at inner edges (``blend="ramp"``, the
default: no seams).
Flash: ``sample_flash`` (4 re-noised steps, x0-prediction) on the whole image, then a one-step latent refine
(``sample_flash`` at t=229 with the K3 Flash U-Net) of the MoVQ latent over blended tiles.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from PIL import Image

from .diffusion import (
    FLASH_TIMESTEPS,
    Conditioning,
    Denoiser,
    ImageCondition,
    MultiDiffusion,
    NoiseSchedule,
    NoiseSource,
    sample_flash,
    sample_with_scheduler,
)
from .devices import default_device
from .diffusion.tiling import BLENDS
from .images import as_pil, pil_to_tensor, tensor_to_pil, with_metadata
from .models.superres import RefineParts, SuperResUNet, refine_context_from_text_encoder
from .models.tiles import tiled_map

SCALES = (2, 4)
TRAIN_TIMESTEPS = 1000  # the DPM-Solver's training schedule: more steps than this have no timesteps to visit


def check_steps(steps: int | None):
    """Refuse a step count the standard upscaler's DPM-Solver cannot run (None: the model's own)."""
    if steps is not None and not 1 <= steps <= TRAIN_TIMESTEPS:
        raise ValueError(f"upscaling steps must be between 1 and {TRAIN_TIMESTEPS}, got {steps}")


def make_dpm_scheduler(steps: int):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear", prediction_type="sample", thresholding=False
    )
    scheduler.set_timesteps(steps)
    return scheduler


class SuperRes:
    """>>> sr = SuperRes.from_pretrained()      # the nano upscaler (64 → 256 px shapes-world scenes)
    >>> big = sr.upscale(image, scale=4)"""

    def __init__(
        self,
        unet: SuperResUNet,
        scale: int = 4,
        mode: str = "standard",
        refine: RefineParts | None = None,
        device="cpu",
        name: str = "custom",
        window: int = 1024,
        stride: int = 800,
        view_batch_size: int = 15,
        steps: int = 5,
        blend: str = "ramp",
    ):
        if mode not in ("standard", "flash"):
            raise ValueError("mode must be 'standard' or 'flash'")
        self.unet, self.scale, self.mode, self.refine_parts = unet, scale, mode, refine
        self.device, self.name = torch.device(device), name
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        self.window, self.stride, self.view_batch_size, self.steps = window, stride, view_batch_size, steps
        self.blend = blend

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike | None = None, *, device=None, dtype=None, local_files_only: bool = False
    ) -> "SuperRes":
        """``nano`` (default), ``x4`` / ``x2`` / ``flash-x2`` (ai-forever/KandiSuperRes), ``tiny`` or a folder."""
        from .checkpoints.superres import load_superres

        device = default_device(device)
        return load_superres(cls, name_or_path, device=device, dtype=dtype, local_files_only=local_files_only)

    # -- public -------------------------------------------------------------------------------------------------

    def upscale(
        self,
        image,
        scale: int | None = None,
        steps: int | None = None,
        seed: int | None = None,
        *,
        window: int | None = None,
        stride: int | None = None,
        view_batch_size: int | None = None,
        blend: str | None = None,
        refine: bool = True,
        generator: torch.Generator | None = None,
        progress: bool = True,
    ) -> Image.Image:
        """Upscale a PIL image (or path / array) by ``scale`` (2 or 4); the result is exactly ``scale×`` the input.

        ``window=0`` runs the whole image as one view (no overlapping windows: less work when memory allows).
        ``blend``: ``"ramp"`` (default) fades views out over the overlap at inner edges; ``"uniform"`` is the
        official plain average.
        """
        check_steps(steps)
        image = self._check_image(image)
        scale = scale or self.scale
        if scale not in SCALES:
            raise ValueError(f"unsupported scale {scale}: use 2 or 4")
        seed = seed if seed is not None else (0 if generator is None else None)
        generator = generator or torch.Generator().manual_seed(seed)
        if self.mode == "flash":
            out = self._flash(image, scale, generator, refine, progress)
        else:
            window = self.window if window is None else window
            blend = blend or self.blend
            if blend not in BLENDS:
                raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
            out = self._standard(
                image,
                scale,
                steps or self.steps,
                generator,
                window,
                stride or self.stride,
                view_batch_size or self.view_batch_size,
                blend,
                progress,
            )
        result = tensor_to_pil(out)[0]
        return with_metadata(
            result,
            {
                "task": "upscale",
                "model": self.name,
                "scale": scale,
                "mode": self.mode,
                "steps": steps or (len(FLASH_TIMESTEPS) if self.mode == "flash" else self.steps),
                "seed": seed,
                "window": window,
                "stride": stride or self.stride,
                **({"blend": blend} if self.mode == "standard" else {}),
            },
        )

    # -- standard: DPM-Solver++ over MultiDiffusion views -----------------------------------------------------------

    @staticmethod
    def _check_image(image) -> Image.Image:
        if isinstance(image, Image.Image) and image.mode not in ("RGB", "RGBA", "L", "P"):
            raise ValueError(f"unsupported image mode {image.mode!r}: give an RGB image")
        image = as_pil(image)
        if image.width < 2 or image.height < 2:
            raise ValueError(f"the image is too small to upscale ({image.width}x{image.height})")
        return image

    def _param(self):
        return next(self.unet.parameters())

    @torch.no_grad()
    def _standard(
        self, image, scale, steps, generator, window, stride, view_batch_size, blend, progress
    ) -> torch.Tensor:
        w, h = image.size
        lowres = pil_to_tensor(image).to(self.device)
        H, W = (h + h % 2) * scale, (w + w % 2) * scale
        f = self.unet.config.downsample_factor  # the canvas must divide by it; released sizes already do
        H, W = -(-H // f) * f, -(-W // f) * f
        if window and window % f:
            raise ValueError(f"window {window} must be a multiple of {f}")
        noise = NoiseSource(generator)
        up_lr = F.interpolate(lowres, size=(H, W), mode="bilinear", align_corners=False)
        denoise = MultiDiffusion(
            Denoiser(self.unet, ImageCondition(up_lr)), H, W, window, stride, view_batch_size, blend
        )
        img = noise.randn((1, 3, H, W), self.device)
        img = sample_with_scheduler(denoise, img, make_dpm_scheduler(steps), steps, noise, progress=progress)
        return self._to_size(img, h * scale, w * scale)

    @staticmethod
    def _to_size(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
        img = img.clamp(-1, 1)
        if img.shape[-2:] != (height, width):
            img = F.interpolate(img, size=(height, width), mode="bilinear", align_corners=True)
        return img

    # -- flash: 4 re-noised steps + one-step latent refine ----------------------------------------------------------

    @torch.no_grad()
    def _flash(self, image, scale, generator, refine, progress) -> torch.Tensor:
        w, h = image.size
        small = image.resize((w - w % 32, h - h % 32), Image.BICUBIC) if (w % 32 or h % 32) else image
        if small.width == 0 or small.height == 0:
            raise ValueError("Flash super-resolution needs an image of at least 32x32 pixels")
        noise = NoiseSource(generator)
        denoise = Denoiser(self.unet, ImageCondition(pil_to_tensor(small)))
        img = noise.randn((1, 3, small.height * scale, small.width * scale), self.device)
        img = sample_flash(
            denoise, img, NoiseSchedule.named("linear"), FLASH_TIMESTEPS, noise, progress, prediction_type="sample"
        )
        if refine and self.refine_parts is not None:
            img = self._refine(img.clamp(-1, 1), noise)
        return self._to_size(img, h * scale, w * scale)

    def _refine(self, img: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
        """One Flash step of the K3 Flash U-Net on the MoVQ latent of the image, over blended latent tiles."""
        r = self.refine_parts
        schedule = NoiseSchedule.named("cosine")
        mp = next(r.movq.parameters())
        z = r.movq.encode(img.to(mp.device, mp.dtype), tiled=True).float()  # the KandiSuperRes MoVQ tiles
        denoise = Denoiser(r.unet, Conditioning(r.context, r.context_mask.bool()))
        f = r.unet.config.downsample_factor

        def one_step(tile: torch.Tensor) -> torch.Tensor:
            h, w = tile.shape[-2:]
            tile = F.pad(tile, (0, -w % f, 0, -h % f), mode="replicate")  # border tiles: pad to the U-Net's factor
            return sample_flash(denoise, tile, schedule, [r.timestep], noise)[..., :h, :w]

        z = tiled_map(z, one_step, r.tile, r.stride) if max(z.shape[-2:]) > r.tile else one_step(z)
        return r.movq.decode(z.to(mp.dtype), tiled=True).float()


__all__ = ["RefineParts", "SuperRes", "make_dpm_scheduler", "refine_context_from_text_encoder"]
