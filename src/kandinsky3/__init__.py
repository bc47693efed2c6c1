"""kandinsky3: the Kandinsky 3.1 image-generation family in PyTorch."""

from .checkpoints import CheckpointError
from .images import read_metadata, save_image
from .models import MoVQ, MoVQConfig, UNet, UNetConfig
from .pipeline import Kandinsky3
from .registry import VARIANTS
from .requests import Control, GenerationSettings, ImageToImage, Inpaint, Mix, Outpaint, TextToImage, Variation
from .superres import SuperRes

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Control",
    "GenerationSettings",
    "ImageToImage",
    "Inpaint",
    "Kandinsky3",
    "Mix",
    "MoVQ",
    "MoVQConfig",
    "Outpaint",
    "SuperRes",
    "TextToImage",
    "UNet",
    "UNetConfig",
    "Variation",
    "VARIANTS",
    "read_metadata",
    "save_image",
]
