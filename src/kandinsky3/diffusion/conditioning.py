"""What the U-Net is conditioned on, per-step adapters, and the Denoiser that turns (x_t, t) into a guided ε."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .tiling import View, crop

BRANCHES = ("cond", "uncond")


def _move(value, device, dtype):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_move(v, device, dtype) for v in value]
    return value.to(device=device, dtype=dtype if value.is_floating_point() else None)


def device_timesteps(t, batch: int, device) -> torch.Tensor:
    """(batch,) float32 timesteps on ``device``: a number becomes a fill there, not a blocking host-to-device copy
    (which would sync every step); a tensor is moved and expanded."""
    if isinstance(t, torch.Tensor):
        return t.to(device, torch.float32).expand(batch)
    return torch.full((batch,), float(t), device=device, dtype=torch.float32)


def _cat(a, b):
    """Stack the cond and uncond values of one U-Net keyword input along the batch (lists element-wise)."""
    if a is None:
        return None
    if isinstance(a, (list, tuple)):
        return [torch.cat([x, y]) for x, y in zip(a, b)]
    return torch.cat([a, b])


@dataclass
class Conditioning:
    """The text condition of a batch of B images.

    context (B, L, D) projected text tokens and context_mask (B, L); uncond_* the same for the unconditional
    branch of classifier-free guidance (None: no guidance possible, e.g. Flash); context_lengths (B,) each
    sample's own crop length when prompts of different lengths share a batch (None: all share L, the official case).
    """

    context: torch.Tensor
    context_mask: torch.Tensor
    uncond_context: torch.Tensor | None = None
    uncond_mask: torch.Tensor | None = None
    context_lengths: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    @property
    def guidable(self) -> bool:
        """Whether there is an unconditional branch to guide against."""
        return self.uncond_context is not None

    def to(self, device=None, dtype=None) -> "Conditioning":
        return replace(self, **{k: _move(getattr(self, k), device, dtype) for k in self.__dataclass_fields__})

    def unet_inputs(self, branch: str) -> dict:
        """The U-Net keyword inputs of one guidance branch."""
        if branch == "cond":
            return dict(context=self.context, context_mask=self.context_mask, context_lengths=self.context_lengths)
        return dict(context=self.uncond_context, context_mask=self.uncond_mask, context_lengths=self.context_lengths)


@dataclass
class ImageCondition:
    """A spatial condition at the canvas size, one U-Net keyword input (KandiSuperRes: the bilinearly upsampled
    low-resolution image, ``lowres``). It has no unconditional branch; :meth:`crop` cuts it with the views of a
    MultiDiffusion canvas."""

    image: torch.Tensor
    keyword: str = "lowres"

    guidable = False

    def to(self, device=None, dtype=None) -> "ImageCondition":
        return replace(self, image=_move(self.image, device, dtype))

    def unet_inputs(self, branch: str) -> dict:
        return {self.keyword: self.image}

    def crop(self, views: Sequence[View]) -> "ImageCondition":
        return replace(self, image=torch.cat([crop(self.image, v) for v in views]))


class Adapter(Protocol):
    """A per-step addition to the U-Net's inputs: called at every step with (x_t, t) for each guidance branch
    ("cond", "uncond"); returns U-Net keyword inputs for that branch (B rows each). ``to`` moves its tensors.

    The three planned adapters: inpainting channels (:class:`ExtraChannels`, ``extra_channels``), ControlNet
    residuals computed from (x_t, t) (``control_residuals``), IP-Adapter image tokens (``image_tokens``).

    ``t`` is the timestep as the sampler gave it — a number (every sampler here), so an adapter that counts steps
    reads it without a device sync — or a tensor from a caller that passes one.

    Optional: ``bind(conditioning) → Adapter``, called once by the :class:`Denoiser`, for an adapter that needs
    each branch's text inputs (the ControlNet runs its own copy of the encoder on them)."""

    def __call__(self, x_t: torch.Tensor, t, branch: str) -> dict: ...

    def to(self, device, dtype) -> "Adapter": ...


@dataclass
class ExtraChannels:
    """Constant extra input channels after x_t in both branches (inpainting: keep-mask, masked-image latent)."""

    channels: torch.Tensor

    def __call__(self, x_t, t, branch: str) -> dict:
        return {"extra_channels": self.channels}

    def to(self, device, dtype) -> "ExtraChannels":
        return ExtraChannels(_move(self.channels, device, dtype))


class Denoiser:
    """Wraps a U-Net with its conditioning and adapters: ``denoiser(x_t, t) → ε`` in fp32 (or x0, for a U-Net that
    predicts x0 such as KandiSuperRes'; the conditioning is a :class:`Conditioning` or an :class:`ImageCondition`).

    With guidance weight w ≠ 0 (and an unconditional branch) it runs one doubled batch, condition first (the
    official order) — every keyword input of the two branches is stacked the same way — and returns
    ``(w+1)·ε_cond − w·ε_uncond``.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        conditioning: Conditioning,
        guidance_weight: float = 0.0,
        adapters: Sequence[Adapter] = (),
    ):
        self.unet = unet
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cond = conditioning.to(self.device, self.dtype)
        self.adapters = [a.to(self.device, self.dtype) for a in adapters]
        # an adapter that needs the text inputs (ControlNet) reads them from the conditioning: `bind` hands it over
        self.adapters = [a.bind(self.cond) if hasattr(a, "bind") else a for a in self.adapters]
        self.guidance_weight = guidance_weight
        self.guided = guidance_weight != 0 and conditioning.guidable

    def crop(self, views: Sequence[View]) -> "Denoiser":
        """The denoiser of a batch of views of a canvas (one view per row): spatial conditions are cut with them."""
        if self.adapters:
            raise ValueError("per-step adapters are not view-aware: MultiDiffusion takes a denoiser without adapters")
        views_denoiser = copy.copy(self)
        views_denoiser.cond = self.cond.crop(views)
        return views_denoiser

    def _inputs(self, x_t: torch.Tensor, t, branch: str) -> dict:
        inputs = self.cond.unet_inputs(branch)
        for adapter in self.adapters:
            inputs.update(adapter(x_t, t, branch))
        return inputs

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t) -> torch.Tensor:
        b = x_t.shape[0]
        given = t  # what the adapters see: the sampler's number (no device read to count steps)
        t = device_timesteps(t, b, self.device)
        x = x_t.to(self.device, self.dtype)
        if not self.guided:
            return self.unet(x, t, **self._inputs(x, given, "cond")).float()
        cond, uncond = self._inputs(x, given, "cond"), self._inputs(x, given, "uncond")
        inputs = {k: _cat(cond[k], uncond[k]) for k in cond}
        eps_cond, eps_uncond = self.unet(torch.cat([x, x]), torch.cat([t, t]), **inputs).float().chunk(2)
        w = self.guidance_weight
        return (w + 1.0) * eps_cond - w * eps_uncond
