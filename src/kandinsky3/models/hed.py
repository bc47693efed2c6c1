"""The HED edge network in the layout of the community ControlNet annotators' ``ControlNetHED.pth``.

``ControlNetHED_Apache2``: a learnable per-channel offset ``norm`` subtracted from the RGB input (pixel values in
[0, 255]), then five VGG-style blocks of 3×3 convs + ReLU (64, 128, 256, 512, 512 channels; 2, 2, 3, 3, 3 convs),
a 2×2 max-pool before blocks 2–5, and after each block a 1×1 ``projection`` to one channel: five side outputs at
full, ½, ¼, ⅛ and 1/16 resolution (logits). Fusing them is post-processing (``kandinsky3.edges.hed``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: (output channels, number of 3×3 convs) of block1..block5
HED_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class HEDBlock(nn.Module):
    """``convs.N`` (3×3, pad 1, each followed by ReLU) and a 1×1 ``projection`` to one side-output channel."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int):
        super().__init__()
        self.convs = nn.Sequential(
            *(nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1) for i in range(num_convs))
        )
        self.projection = nn.Conv2d(out_channels, 1, 1)

    def forward(self, h: torch.Tensor, downsample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if downsample:
            h = F.max_pool2d(h, kernel_size=2, stride=2)
        for conv in self.convs:
            h = F.relu(conv(h))
        return h, self.projection(h)


class HED(nn.Module):
    """(B, 3, H, W) RGB in [0, 255] → five side-output logits (B, 1, H/2^k, W/2^k), k = 0..4."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        channels = 3
        for index, (width, convs) in enumerate(HED_BLOCKS, start=1):
            self.add_module(f"block{index}", HEDBlock(channels, width, convs))
            channels = width

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        h = pixels - self.norm
        sides = []
        for index in range(1, len(HED_BLOCKS) + 1):
            h, side = getattr(self, f"block{index}")(h, downsample=index > 1)
            sides.append(side)
        return sides
