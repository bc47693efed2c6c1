"""Super-resolution training: HR crops, LR from the degradation pipeline (or the shapes world's low-res render),
x0 loss on the linear schedule, the upscaler U-Net conditioned on the bilinear-upsampled LR."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoints.io import load_into
from ...checkpoints.loading import parse_dtype
from ...checkpoints.superres import save_superres
from ...diffusion import NoiseSchedule
from ...images import tensor_to_pil
from ...models.config import ConfigError
from ...models.seeding import drawing_from
from ...models.superres import SuperResUNet, SuperResUNetConfig
from ..degradations import degrade
from .base import Recipe, image_grid


@dataclass
class SuperResParams:
    """``model:`` of the superres recipe. With the shapes world, ``data.size`` is the low-res size and the HR is
    the same scene rendered at ``size × scale``."""

    name: str = "custom"
    scale: int = 4
    crop: int | None = None  # HR crop size: the network is convolutional, so train on crops
    degrade: bool | None = None  # Real-ESRGAN-style LR; default: on for folders, off for the world (its own render)
    unet: SuperResUNetConfig = field(default_factory=SuperResUNetConfig)
    init: str | None = None  # continue from exported weights (a name such as ``nano`` or a folder)
    export_dtype: str | None = None  # e.g. fp16: cast the exported weights

    def validate(self, cfg):
        if self.scale not in (2, 4):
            raise ConfigError(f"model.scale must be 2 or 4, got {self.scale}")
        if self.crop is not None and (self.crop < self.scale or self.crop % self.scale):
            raise ConfigError(f"model.crop must be a multiple of model.scale ({self.scale}), got {self.crop}")


class SuperResTrainable(nn.Module):
    def __init__(self, unet: SuperResUNet):
        super().__init__()
        self.unet = unet
        self.schedule = NoiseSchedule.named("linear")

    def forward(self, batch, generator: torch.Generator):
        """x0-MSE at a uniform timestep; ``generator`` (on the batch's device) draws the timestep and the noise."""
        hr, lr = batch["hr"], batch["lr"]
        t = torch.randint(0, self.schedule.num_timesteps, (hr.shape[0],), device=hr.device, generator=generator)
        noise = torch.randn(hr.shape, device=hr.device, dtype=hr.dtype, generator=generator)
        x_t = self.schedule.q_sample(hr, t, noise)
        return F.mse_loss(self.unet(x_t, t.float(), lr).float(), hr)


class SuperResRecipe(Recipe):
    Params = SuperResParams

    def __init__(self, cfg, device, rng):
        m = cfg.model
        self.scale = m.scale
        self.world = cfg.data.source == "world"
        self.extra_sizes = (cfg.data.size * self.scale,) if self.world else ()
        super().__init__(cfg, device, rng)
        with drawing_from(rng.cpu):
            self.trainable = SuperResTrainable(SuperResUNet(m.unet))
        if m.init:  # continue from exported weights (a name such as ``nano`` or a folder)
            from ...superres import SuperRes

            init = SuperRes.from_pretrained(m.init, device="cpu").unet.state_dict()
            load_into(self.trainable.unet, init, f"super-resolution weights in {m.init}")
        self.modules = {"model": self.trainable}
        self.use_degradation = m.degrade if m.degrade is not None else not self.world
        self.preview = [self.dataset[i] for i in range(min(4, len(self.dataset)))]

    def _pair(self, batch, seed: int):
        if self.world:
            hr = batch[f"image_{self.cfg.data.size * self.scale}"]
            lr = degrade(hr, self.scale, seed=seed) if self.use_degradation else batch["image"]
        else:
            hr = batch["image"]
            lr = degrade(hr, self.scale, seed=seed)
        return hr, lr

    def prepare(self, batch, ctx):
        # the degradation and the crop are pure functions of the step number: the same after a resume
        hr, lr = self._pair(batch, ctx.step)
        crop = self.params.crop
        if crop and crop < hr.shape[-1]:
            g = torch.Generator().manual_seed(ctx.step)
            lr_crop = crop // self.scale
            y, x = (int(torch.randint(0, s - lr_crop + 1, (1,), generator=g)) for s in lr.shape[-2:])
            lr = lr[..., y : y + lr_crop, x : x + lr_crop]
            hr = hr[..., y * self.scale : (y + lr_crop) * self.scale, x * self.scale : (x + lr_crop) * self.scale]
        return {"hr": hr.to(self.device), "lr": lr.to(self.device)}

    def step(self, modules, batch, ctx):
        return {"loss": modules["model"](batch, ctx.generator(self.device))}

    @torch.no_grad()
    def sample_grid(self, modules):
        from ...superres import SuperRes

        module = modules["model"]
        was = module.training
        module.eval()
        batch = {k: torch.stack([p[k] for p in self.preview]) for k in self.preview[0] if k != "caption"}
        hr, lr = self._pair(batch, seed=0)  # the same low-res previews in every grid
        sr = SuperRes(module.unet, self.scale, device=self.device, window=0)
        ups = [sr.upscale(tensor_to_pil(x[None])[0], seed=0, progress=False) for x in lr]
        module.train(was)
        bicubic = [tensor_to_pil(F.interpolate(x[None], scale_factor=self.scale, mode="bicubic"))[0] for x in lr]
        return image_grid([bicubic, ups, tensor_to_pil(hr)])

    def export(self, modules, path):
        save_superres(
            modules["model"].unet, path, self.scale, self.params.name, parse_dtype(self.params.export_dtype, None)
        )
