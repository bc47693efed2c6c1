"""Everything about files: official .pt, diffusers folders, our safetensors layout, hub download, conversion."""

from .io import CheckpointError, load_file, save_safetensors
from .layouts import RawCheckpoint, convert, detect_layout, read
from .loading import Components, load_components, resolve, save_components, tiny_components

__all__ = [
    "CheckpointError",
    "Components",
    "RawCheckpoint",
    "convert",
    "detect_layout",
    "load_components",
    "load_file",
    "read",
    "resolve",
    "save_components",
    "save_safetensors",
    "tiny_components",
]
