"""Super-resolution training: HR crops, LR from the degradation pipeline (or the shapes world's low-res render),
x0 loss on the linear schedule, the upscaler U-Net conditioned on the bilinear-upsampled LR."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoints.io import load_into
from ...checkpoints.loading import parse_dtype
from ...checkpoints.superres import save_superres
from ...diffusion import NoiseSchedule
from ...images import tensor_to_pil
from ...models.superres import SuperResUNet, SuperResUNetConfig
from ..degradations import degrade
from .base import Recipe, image_grid


class SuperResTrainable(nn.Module):
    def __init__(self, unet: SuperResUNet):
        super().__init__()
        self.unet = unet
        self.schedule = NoiseSchedule.named("linear")

    def forward(self, batch):
        hr, lr = batch["hr"], batch["lr"]
        t = torch.randint(0, self.schedule.num_timesteps, (hr.shape[0],), device=hr.device)
        x_t = self.schedule.q_sample(hr, t, torch.randn_like(hr))
        return F.mse_loss(self.unet(x_t, t.float(), lr).float(), hr)


class SuperResRecipe(Recipe):
    """model: {unet: SuperResUNetConfig fields, scale: 4, degrade: true, crop: 64}. With the shapes world,
    ``data.size`` is the low-res size and the HR is the same scene rendered at ``size × scale``."""

    def __init__(self, cfg, device):
        self.scale = cfg.model.get("scale", 4)
        self.world = cfg.data.source == "world"
        self.extra_sizes = (cfg.data.size * self.scale,) if self.world else ()
        super().__init__(cfg, device)
        torch.manual_seed(cfg.seed)
        self.trainable = SuperResTrainable(SuperResUNet(SuperResUNetConfig.from_dict(cfg.model.get("unet", {}))))
        if cfg.model.get("init"):  # continue from exported weights (a name such as ``nano`` or a folder)
            from ...superres import SuperRes

            init = SuperRes.from_pretrained(cfg.model["init"], device="cpu").unet.state_dict()
            load_into(self.trainable.unet, init, f"super-resolution weights in {cfg.model['init']}")
        self.use_degradation = cfg.model.get("degrade", not self.world)
        self.step = 0
        self.preview = [self.dataset[i] for i in range(4)]

    def _pair(self, batch):
        if self.world:
            hr = batch[f"image_{self.cfg.data.size * self.scale}"]
            lr = degrade(hr, self.scale, seed=self.step) if self.use_degradation else batch["image"]
        else:
            hr = batch["image"]
            lr = degrade(hr, self.scale, seed=self.step)
        return hr, lr

    def prepare(self, batch):
        self.step += 1
        hr, lr = self._pair(batch)
        crop = self.cfg.model.get("crop")  # HR crop size: the network is convolutional, so train on crops
        if crop and crop < hr.shape[-1]:
            g = torch.Generator().manual_seed(self.step)
            lr_crop = crop // self.scale
            y, x = (int(torch.randint(0, s - lr_crop + 1, (1,), generator=g)) for s in lr.shape[-2:])
            lr = lr[..., y:y + lr_crop, x:x + lr_crop]
            hr = hr[..., y * self.scale:(y + lr_crop) * self.scale, x * self.scale:(x + lr_crop) * self.scale]
        return {"hr": hr.to(self.device), "lr": lr.to(self.device)}

    @torch.no_grad()
    def sample_grid(self, module):
        from ...superres import SuperRes

        was = module.training
        module.eval()
        batch = {k: torch.stack([p[k] for p in self.preview]) for k in self.preview[0] if k != "caption"}
        hr, lr = self._pair(batch)
        sr = SuperRes(module.unet, self.scale, device=self.device, window=0)
        ups = [sr.upscale(tensor_to_pil(x[None])[0], progress=False) for x in lr]
        module.train(was)
        bicubic = [tensor_to_pil(F.interpolate(x[None], scale_factor=self.scale, mode="bicubic"))[0] for x in lr]
        return image_grid([bicubic, ups, tensor_to_pil(hr)])

    def export(self, module, path):
        save_superres(module.unet, path, self.scale, self.cfg.model.get("name", "custom"),
                      parse_dtype(self.cfg.model.get("export_dtype"), None))
