"""Images with object boxes and a prompt per box, for the inpainting recipe.

Two sources give the same items — ``pixels`` (3, S, S) uint8, ``caption`` (the whole image's), ``boxes``
(max_objects, 4) float pixel boxes (x0, y0, x1, y1) padded with −1, ``regions`` (one prompt per box):

- the shapes world (:class:`WorldRegions`): the renderer knows every object's box, and its exact description
  (``region_prompts: caption``) or only its shape (``class``, the class-name ablation);
- an image folder with COCO-style boxes (:class:`CocoRegions`): ``annotations.json`` (``images`` with
  ``file_name``/``width``/``height``, ``annotations`` with ``image_id``/``bbox`` [x, y, w, h]/``category_id``,
  ``categories`` with ``name``), region captions from the ``kandinsky3 caption-regions`` manifest
  (``regions.jsonl``), else the class name; whole-image captions from ``name.txt`` beside each image.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image

from ..world.dataset import pil_to_bytes

REGION_PROMPTS = ("caption", "class")


def _pad_boxes(boxes: list, max_objects: int) -> torch.Tensor:
    out = torch.full((max_objects, 4), -1.0)
    for i, b in enumerate(boxes[:max_objects]):
        out[i] = torch.tensor(b, dtype=torch.float32)
    return out


def world_region_prompt(obj, rng: random.Random, mode: str) -> str:
    """An object's prompt: its description (colour and shape always; size and position usually), or its class."""
    from ..world.captions import describe_object

    if mode == "class":
        return obj.shape
    return describe_object(obj, rng, p_size=0.8, p_position=0.8, p_color=1.0)


class WorldRegions(torch.utils.data.Dataset):
    """Shapes-world scenes with their objects' boxes and prompts, rendered once into memory (uint8)."""

    def __init__(self, length: int, split: str = "train", size: int = 64, region_prompts: str = "caption"):
        from tqdm.auto import tqdm

        from ..world.dataset import SPLIT_SEEDS, world_sample
        from ..world.render import render

        if region_prompts not in REGION_PROMPTS:
            raise ValueError(f"region_prompts must be one of {', '.join(REGION_PROMPTS)}, got {region_prompts!r}")
        self.captions, self.regions, pixels, boxes = [], [], [], []
        for i in tqdm(range(length), desc="rendering scenes with boxes", leave=False):
            s = world_sample(i, split, size)
            rng = random.Random(SPLIT_SEEDS[split] + i * 7919 + 1)
            self.captions.append(s.caption)
            self.regions.append([world_region_prompt(o, rng, region_prompts) for o in s.scene.objects])
            pixels.append(pil_to_bytes(s.image))
            boxes.append(_pad_boxes(render(s.scene, size).boxes, 3))
        self.tensors = {"image": torch.stack(pixels), "boxes": torch.stack(boxes)}

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return {
            "caption": self.captions[i],
            "regions": self.regions[i],
            **{k: v[i] for k, v in self.tensors.items()},
        }


def read_coco_boxes(annotations: str | Path, root: str | Path) -> dict[str, list[tuple[tuple[float, ...], str]]]:
    """``file_name → [(box (x0, y0, x1, y1), class name)]`` from a COCO-style JSON; a box outside its image
    (or an image without width/height) is an error naming the file."""
    path = Path(annotations)
    data = json.loads(path.read_text())
    images = {im["id"]: im for im in data.get("images", [])}
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    out: dict[str, list] = {im["file_name"]: [] for im in images.values()}
    for ann in data.get("annotations", []):
        im = images.get(ann["image_id"])
        if im is None:
            raise ValueError(
                f"{path}: annotation {ann.get('id')} names image_id {ann['image_id']}, which is not listed"
            )
        x, y, w, h = (float(v) for v in ann["bbox"])
        width, height = im.get("width"), im.get("height")
        if width is None or height is None:
            width, height = Image.open(Path(root) / im["file_name"]).size
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width + 0.5 or y + h > height + 0.5:
            raise ValueError(
                f"{path}: the box {[x, y, w, h]} (x, y, w, h) of {im['file_name']} is outside its {width}x{height} "
                "image (or empty); fix or drop that annotation"
            )
        out[im["file_name"]].append(((x, y, min(x + w, width), min(y + h, height)), names.get(ann["category_id"], "")))
    return out


def read_region_manifest(path: str | Path) -> dict[tuple[str, int], str]:
    """``(file, box index) → caption`` from a ``caption-regions`` JSONL manifest (missing file: empty)."""
    path = Path(path)
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[(row["file"], int(row["box"]))] = row["caption"]
    return out


class CocoRegions(torch.utils.data.Dataset):
    """An image folder with COCO-style boxes; images are centre-cropped and resized to ``size`` (boxes follow;
    boxes cut by the crop are clipped, boxes left with under half their area are dropped)."""

    def __init__(
        self,
        root: str | Path,
        size: int,
        annotations: str | Path | None = None,
        region_prompts: str = "caption",
        manifest: str | Path | None = None,
        max_objects: int = 8,
    ):
        self.root, self.size, self.max_objects = Path(root), size, max_objects
        self.boxes = read_coco_boxes(annotations or self.root / "annotations.json", self.root)
        self.files = sorted(self.boxes)
        if not self.files:
            raise FileNotFoundError(f"no images listed in {annotations or self.root / 'annotations.json'}")
        captions = read_region_manifest(manifest or self.root / "regions.jsonl") if region_prompts == "caption" else {}
        self.prompts = {f: [captions.get((f, i), name) for i, (_, name) in enumerate(b)] for f, b in self.boxes.items()}

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        name = self.files[i]
        image = Image.open(self.root / name).convert("RGB")
        w, h = image.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s)).resize((self.size, self.size), Image.BICUBIC)
        scale = self.size / s
        boxes, prompts = [], []
        for (x0, y0, x1, y1), prompt in zip((b for b, _ in self.boxes[name]), self.prompts[name]):
            cx0, cy0 = max(x0 - left, 0), max(y0 - top, 0)
            cx1, cy1 = min(x1 - left, s), min(y1 - top, s)
            if cx1 <= cx0 or cy1 <= cy0 or (cx1 - cx0) * (cy1 - cy0) < 0.5 * (x1 - x0) * (y1 - y0):
                continue
            boxes.append((cx0 * scale, cy0 * scale, cx1 * scale, cy1 * scale))
            prompts.append(prompt)
        caption_file = (self.root / name).with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else ""
        return {
            "caption": caption,
            "regions": prompts[: self.max_objects],
            "image": pil_to_bytes(image),
            "boxes": _pad_boxes(boxes, self.max_objects),
        }


__all__ = ["CocoRegions", "REGION_PROMPTS", "WorldRegions", "read_coco_boxes", "read_region_manifest"]
