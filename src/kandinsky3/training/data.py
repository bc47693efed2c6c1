"""Training data: the shapes world, a folder of image + caption files, or webdataset shards."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..images import pil_to_tensor
from ..world.dataset import ShapesDataset
from .config import DataConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)  # centre crop, then resize
    image = image.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((size, size), Image.BICUBIC)
    return pil_to_tensor(image)[0]


class CaptionFolder(torch.utils.data.Dataset):
    """``name.png`` + ``name.txt`` pairs (a missing caption means the empty prompt)."""

    def __init__(self, root: str | Path, size: int):
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        self.size = size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else ""
        return {"image": _image_tensor(Image.open(path), self.size), "caption": caption}


class InMemory(torch.utils.data.Dataset):
    """Materialise a (deterministic) dataset once: rendering costs more than a training step on a CPU.

    With ``num_workers`` the items are rendered by that many processes (the order, and so every item, is the same).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, num_workers: int = 0):
        from tqdm.auto import tqdm

        chunks = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=num_workers,
                                             collate_fn=torch.utils.data.default_collate)
        captions, tensors = [], {}
        for chunk in tqdm(chunks, desc="rendering", leave=False):
            captions += chunk.pop("caption")
            for k, v in chunk.items():
                tensors.setdefault(k, []).append(v)
        self.captions = captions
        self.tensors = {k: torch.cat(v) for k, v in tensors.items()}

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return {"caption": self.captions[i], **{k: v[i] for k, v in self.tensors.items()}}


def make_dataset(cfg: DataConfig, extra_sizes: tuple[int, ...] = ()) -> torch.utils.data.Dataset:
    if cfg.source == "world":
        ds = ShapesDataset(cfg.length, cfg.split, cfg.size, extra_sizes)
        return InMemory(ds, cfg.num_workers) if cfg.cache else ds
    if cfg.source == "folder":
        if not cfg.path:
            raise ValueError("data.source=folder needs data.path")
        return CaptionFolder(cfg.path, cfg.size)
    if cfg.source == "webdataset":
        try:
            import webdataset as wds
        except ImportError as exc:
            raise ImportError("data.source=webdataset needs `pip install webdataset`") from exc
        size = cfg.size
        return (wds.WebDataset(cfg.path, shardshuffle=True).decode("pil")
                .to_tuple("jpg;png;webp", "txt")
                .map(lambda s: {"image": _image_tensor(s[0], size), "caption": s[1]}))
    raise ValueError(f"unknown data.source {cfg.source!r}: world, folder or webdataset")
