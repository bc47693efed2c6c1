"""Test helper: record what a U-Net is called with (imported by the test modules next to it)."""

import inspect

import torch


class UNetCalls:
    """Record the arguments (by name) of every U-Net forward inside the ``with`` block."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []
        self.signature = inspect.signature(unet.forward)

    def _hook(self, module, args, kwargs):
        bound = self.signature.bind(*args, **kwargs).arguments
        self.calls.append({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in bound.items()})

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def timesteps(self) -> list[int]:
        return [int(c["time"][0].item()) for c in self.calls]

    def channels(self, i: int = 0) -> torch.Tensor:
        """All input channels of call ``i`` as the first layer sees them: x_t, then any extra channels (inpainting)
        whether they come concatenated in ``x`` or as the ``extra_channels`` input."""
        call = self.calls[i]
        extra = call.get("extra_channels")
        return call["x"] if extra is None else torch.cat([call["x"], extra], dim=1)
