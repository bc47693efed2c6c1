"""Pure ``nn.Module``s: no file I/O, no hub, no PIL."""

from .movq import MoVQ, MoVQConfig
from .text import TextEncoder, build_word_tokenizer, make_projection
from .unet import UNet, UNetConfig

__all__ = ["MoVQ", "MoVQConfig", "TextEncoder", "UNet", "UNetConfig", "build_word_tokenizer", "make_projection"]
