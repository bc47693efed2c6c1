"""The ControlNet adapter: residuals for the U-Net's skips, computed from (x_t, t), the hint and the text at every
step (spec §8.4), scaled by ``scale`` inside the control window and skipped outside it.

Steps are counted by a :class:`~.steps.StepClock` (the rules are in :mod:`.steps`); step i of an N-step run is
controlled when ``int(N·start) ≤ i < int(N·end)``; outside that window the scale is 0 and the ControlNet is not
run at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .conditioning import Conditioning, _move, device_timesteps
from .steps import StepClock, step_window


control_window = step_window  # the step indices [int(N·start), int(N·end)) that get the ControlNet's residuals


def scale_at(scale, shape: tuple[int, ...]) -> torch.Tensor | float:
    """``scale`` for a residual of ``shape`` (B, C, h, w): a number as is, a spatial map — (H, W), (1|B, 1, H, W) —
    resized to (h, w) with 'nearest-exact' (the fork's img2img/regional ControlNet)."""
    if not torch.is_tensor(scale):
        return float(scale)
    k = scale
    if k.dim() == 2:
        k = k[None, None]
    if k.shape[-2:] != tuple(shape[-2:]):
        k = F.interpolate(k.float(), size=tuple(shape[-2:]), mode="nearest-exact").to(k.dtype)
    return k


@dataclass
class ControlAdapter:
    """``adapter(x_t, t, branch) → {"control_residuals": [...]}`` for the U-Net.

    controlnet: a :class:`~kandinsky3.models.controlnet.ControlNet`; hint: (1 | B, C, H, W) at image resolution
    (expanded over the batch); scale: a number or a spatial map (H, W) / (1 | B, 1, H, W); start / end: the
    control window as fractions of the run's ``steps`` (the denoiser calls the sampler makes). The text inputs of
    each branch come from the Denoiser's :class:`Conditioning` (:meth:`bind`)."""

    controlnet: torch.nn.Module
    hint: torch.Tensor
    scale: float | torch.Tensor = 1.0
    start: float = 0.0
    end: float = 1.0
    steps: int = 1
    conditioning: Conditioning | None = None
    clock: StepClock = field(default_factory=StepClock, repr=False)

    def __post_init__(self):
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"the control window needs 0 ≤ start ≤ end ≤ 1, got start {self.start}, end {self.end}")

    @property
    def window(self) -> range:
        return control_window(self.steps, self.start, self.end)

    def to(self, device, dtype) -> "ControlAdapter":
        """A fresh adapter (step count reset) with the hint (and a spatial scale) on ``device``; the ControlNet
        module itself is moved there (in place) if it is elsewhere, in the U-Net's dtype."""
        param = next(self.controlnet.parameters())
        if param.device != torch.device(device) or param.dtype != dtype:
            self.controlnet.to(device=device, dtype=dtype)
        scale = _move(self.scale, device, dtype) if torch.is_tensor(self.scale) else self.scale
        return replace(self, hint=_move(self.hint, device, dtype), scale=scale, clock=StepClock())

    def bind(self, conditioning: Conditioning) -> "ControlAdapter":
        """The same adapter reading each branch's text inputs from ``conditioning`` (called by the Denoiser)."""
        return replace(self, conditioning=conditioning, clock=StepClock())

    def scale_for_step(self, step: int):
        return self.scale if step in self.window else 0.0

    @torch.no_grad()
    def residuals(self, x_t: torch.Tensor, t: torch.Tensor, text: dict, scale) -> list[torch.Tensor]:
        """The scaled residuals for a batch (``text``: the U-Net's context keyword inputs for it)."""
        hint = self.hint
        if hint.shape[0] != x_t.shape[0]:
            hint = hint.expand(x_t.shape[0], -1, -1, -1)
        residuals = self.controlnet(x_t, t, hint, **text)
        return [r * scale_at(scale, r.shape) for r in residuals]

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, branch: str) -> dict:
        if self.conditioning is None:
            raise RuntimeError("ControlAdapter needs the text condition: the Denoiser binds it (adapter.bind)")
        step = self.clock.tick(t)
        t = device_timesteps(t, x_t.shape[0], x_t.device)
        scale = self.scale_for_step(step)
        if not torch.is_tensor(scale) and scale == 0.0:
            return {}  # outside the window (or scale 0): the U-Net gets no residuals, the ControlNet is not run
        text = self.conditioning.unet_inputs(branch)
        return {"control_residuals": self.residuals(x_t, t, text, scale)}


__all__ = ["ControlAdapter", "control_window", "scale_at"]
