"""``SuperRes``: KandiSuperRes pixel-diffusion upscaling (spec §7), standard and Flash modes.

Standard: x0-prediction, ``DPMSolverMultistepScheduler`` (linear betas, ``prediction_type="sample"``), 5 steps,
MultiDiffusion over 1024-px windows with stride 800, each view batch with its own solver history; views averaged
uniformly (official, ``blend="uniform"``) or faded out at inner edges (``blend="ramp"``, the default: no seams).
Flash: 4 re-noised steps on the whole image, then a one-step latent refine with the K3 Flash U-Net and the MoVQ
over blended tiles.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from PIL import Image

from .diffusion import FLASH_TIMESTEPS, NoiseSchedule
from .diffusion.tiling import BLENDS, ViewAverager, crop, get_views
from .images import as_pil, pil_to_tensor, tensor_to_pil, with_metadata
from .models.superres import RefineParts, SuperResUNet, refine_context_from_text_encoder
from .models.tiles import tiled_map

SCALES = (2, 4)


def make_dpm_scheduler(steps: int):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", prediction_type="sample", thresholding=False)
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

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
        from tqdm.auto import tqdm

        p = self._param()
        w, h = image.size
        lowres = pil_to_tensor(image).to(self.device)
        H, W = (h + h % 2) * scale, (w + w % 2) * scale
        f = self.unet.config.downsample_factor  # the canvas must divide by it; released sizes already do
        H, W = -(-H // f) * f, -(-W // f) * f
        if window and window % f:
            raise ValueError(f"window {window} must be a multiple of {f}")
        img = torch.randn(1, 3, H, W, generator=generator, device=generator.device).to(self.device)
        up_lr = F.interpolate(lowres, size=(H, W), mode="bilinear", align_corners=False)
        views = get_views(H, W, window, stride) if window else [(0, H, 0, W)]
        batches = [views[i : i + view_batch_size] for i in range(0, len(views), view_batch_size)]
        schedulers = [make_dpm_scheduler(steps) for _ in batches]  # each view batch keeps its own history
        timesteps = schedulers[0].timesteps
        bar = tqdm(total=len(timesteps) * len(views), desc="upscaling", disable=not progress, leave=False)
        for t in timesteps:
            average = ViewAverager(img, blend, ramp=max(0, (window or 0) - stride))
            for batch, scheduler in zip(batches, schedulers):
                x = torch.cat([crop(img, v) for v in batch])
                low = torch.cat([crop(up_lr, v) for v in batch])
                time = torch.full((x.shape[0],), float(t), device=self.device)
                x0 = self.unet(x.to(p.dtype), time, low.to(p.dtype)).float()
                x_prev = scheduler.step(x0, t, x).prev_sample
                for view, result in zip(batch, x_prev.split(1)):
                    average.add(view, result)
                bar.update(len(batch))
            img = average.result()
        bar.close()
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
        from tqdm.auto import tqdm

        p = self._param()
        w, h = image.size
        small = image.resize((w - w % 32, h - h % 32), Image.BICUBIC) if (w % 32 or h % 32) else image
        if small.width == 0 or small.height == 0:
            raise ValueError("Flash super-resolution needs an image of at least 32x32 pixels")
        lowres = pil_to_tensor(small).to(self.device)
        schedule = NoiseSchedule.named("linear")
        img = torch.randn(
            1, 3, small.height * scale, small.width * scale, generator=generator, device=generator.device
        ).to(self.device)
        for t in tqdm(FLASH_TIMESTEPS, desc="upscaling (flash)", disable=not progress, leave=False):
            noise = torch.randn(img.shape, generator=generator, device=generator.device).to(self.device)
            x_t = schedule.q_sample(img, t, noise)
            img = self.unet(x_t.to(p.dtype), torch.full((1,), float(t), device=self.device), lowres.to(p.dtype)).float()
        if refine and self.refine_parts is not None:
            img = self._refine(img.clamp(-1, 1), generator)
        return self._to_size(img, h * scale, w * scale)

    def _refine(self, img: torch.Tensor, generator) -> torch.Tensor:
        r = self.refine_parts
        schedule = NoiseSchedule.named("cosine")
        mp, up = next(r.movq.parameters()), next(r.unet.parameters())
        z = r.movq.encode(img.to(mp.device, mp.dtype), tiled=True).float()  # the KandiSuperRes MoVQ tiles
        context, mask = r.context.to(up.device, up.dtype), r.context_mask.to(up.device)

        f = r.unet.config.downsample_factor

        def one_step(tile: torch.Tensor) -> torch.Tensor:
            h, w = tile.shape[-2:]
            tile = F.pad(tile, (0, -w % f, 0, -h % f), mode="replicate")  # border tiles: pad to the U-Net's factor
            noise = torch.randn(tile.shape, generator=generator, device=generator.device).to(tile.device)
            x_t = schedule.q_sample(tile, r.timestep, noise)
            time = torch.full((tile.shape[0],), float(r.timestep), device=up.device)
            eps = r.unet(
                x_t.to(up.dtype), time, context.expand(tile.shape[0], -1, -1), mask.expand(tile.shape[0], -1).bool()
            ).float()
            return schedule.x0_from_eps(x_t, r.timestep, eps)[..., :h, :w]

        z = tiled_map(z, one_step, r.tile, r.stride) if max(z.shape[-2:]) > r.tile else one_step(z)
        return r.movq.decode(z.to(mp.dtype), tiled=True).float()


__all__ = ["RefineParts", "SuperRes", "make_dpm_scheduler", "refine_context_from_text_encoder"]
