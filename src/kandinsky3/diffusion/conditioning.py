"""What the U-Net is conditioned on, and the Denoiser that turns (x_t, t) into a guided ε."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Conditioning:
    """Everything besides (x_t, t) that one U-Net call needs, for a batch of B images.

    context (B, L, D) projected text tokens and context_mask (B, L); uncond_* the same for the unconditional
    branch of classifier-free guidance (None: no guidance possible, e.g. Flash); extra_channels (B, C, h, w) are
    concatenated after x_t (inpainting: mask then masked-image latent); control_residuals are added to the
    U-Net skips (ControlNet); context_lengths (B,) each sample's own crop length when prompts of different
    lengths share a batch (None: all share L, the official case).
    """

    context: torch.Tensor
    context_mask: torch.Tensor
    uncond_context: torch.Tensor | None = None
    uncond_mask: torch.Tensor | None = None
    extra_channels: torch.Tensor | None = None
    control_residuals: list[torch.Tensor] | None = None
    context_lengths: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def to(self, device=None, dtype=None) -> "Conditioning":
        def move(t):
            if t is None:
                return None
            if isinstance(t, list):
                return [move(x) for x in t]
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return replace(self, **{k: move(getattr(self, k)) for k in self.__dataclass_fields__})


class Denoiser:
    """Wraps a U-Net with its conditioning: ``denoiser(x_t, t) → ε`` in fp32.

    With guidance weight w > 0 (and an unconditional branch) it runs one doubled batch, condition first
    (the official order), and returns ``(w+1)·ε_cond − w·ε_uncond``.
    """

    def __init__(self, unet: torch.nn.Module, conditioning: Conditioning, guidance_weight: float = 0.0):
        self.unet = unet
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cond = conditioning.to(self.device, self.dtype)
        self.guidance_weight = guidance_weight
        self.guided = guidance_weight != 0 and conditioning.uncond_context is not None

    def _unet_input(self, x_t: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        x = x_t.to(self.device, self.dtype)
        return x if extra is None else torch.cat([x, extra], dim=1)

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t) -> torch.Tensor:
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=self.device, dtype=torch.float32).expand(b)
        c = self.cond
        if not self.guided:
            eps = self.unet(self._unet_input(x_t, c.extra_channels), t, c.context, c.context_mask, c.control_residuals,
                            c.context_lengths)
            return eps.float()
        x_in = self._unet_input(torch.cat([x_t, x_t]), None if c.extra_channels is None else torch.cat([c.extra_channels] * 2))
        context = torch.cat([c.context, c.uncond_context])
        mask = torch.cat([c.context_mask, c.uncond_mask])
        residuals = None if c.control_residuals is None else [torch.cat([r, r]) for r in c.control_residuals]
        lengths = None if c.context_lengths is None else torch.cat([c.context_lengths] * 2)
        eps_cond, eps_uncond = self.unet(x_in, torch.cat([t, t]), context, mask, residuals, lengths).float().chunk(2)
        w = self.guidance_weight
        return (w + 1.0) * eps_cond - w * eps_uncond
