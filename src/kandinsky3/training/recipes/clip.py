"""Contrastive CLIP training on the shapes world (the nano CLIP: the nano IP-Adapter's image encoder, and the
CLIP-score metric of ``kandinsky3 eval clipscore``).

A ``transformers.CLIPModel`` (``models.clip.nano_clip_config``) over nano's word-level tokenizer learns the
symmetric InfoNCE loss of CLIP on (render, caption) batches, plus a **hard-negative** term: each render also
ranks its complete caption against ``hard_negatives`` foil captions that differ in exactly one attribute (colour,
shape, size, position of one object, or the background; ``world/foils.py``). Random in-batch negatives almost never
differ in one attribute only, and telling those apart is what the IP-Adapter needs from the embedding and what the
zero-shot retrieval check measures.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoints.loading import parse_dtype
from ...models.clip import clip_embedders, nano_clip_config, nano_image_processor
from ...models.config import ConfigError
from ...models.seeding import drawing_from
from ...models.text import build_word_tokenizer
from ...world import caption_scene, vocabulary
from ...world.dataset import SPLIT_SEEDS, float_pixels, pil_to_bytes, world_sample
from ...world.foils import foil_captions, retrieval_accuracy
from ..data import materialise
from .base import Recipe


@dataclass
class ClipParams:
    """``model:`` of the clip recipe."""

    name: str = "nano-clip"
    patch_size: int = 8
    width: int = 128
    vision_layers: int = 4
    text_layers: int = 2
    heads: int = 4
    projection_dim: int = 64
    hard_negatives: int = 3  # one-attribute foil captions per render (0: plain CLIP)
    hard_negative_weight: float = 1.0
    probe_scenes: int = 100  # zero-shot retrieval (1 true vs 7 foils) on this many val renders at sample_every
    export_dtype: str | None = "fp16"
    init: str | None = None  # a CLIP folder (an export) to continue from; its architecture replaces the sizes above

    def validate(self, cfg):
        if self.hard_negatives < 0 or self.hard_negative_weight < 0:
            raise ConfigError("model.hard_negatives and model.hard_negative_weight must be ≥ 0")
        if cfg.data.source != "world" and self.hard_negatives:
            raise ConfigError("hard negatives need the shapes world (data.source: world), or model.hard_negatives: 0")
        if cfg.data.size % self.patch_size:
            raise ConfigError(f"data.size {cfg.data.size} is not a multiple of model.patch_size {self.patch_size}")


def _world_captions_item(split: str, size: int, k: int, i: int) -> tuple:
    s = world_sample(i, split, size)
    rng = random.Random(SPLIT_SEEDS[split] * 31 + i)
    complete = caption_scene(s.scene, rng, complete=True)  # before the foils: the order every run so far drew
    foils = [c for c, _ in foil_captions(s.scene, rng, k)] if k else []
    return pil_to_bytes(s.image), s.caption, complete, foils


class WorldCaptions(torch.utils.data.Dataset):
    """Renders of a world split with their caption, complete caption and ``k`` one-attribute foils, materialised
    once (rendering costs more than a training step on a CPU), by ``num_workers`` processes when > 0. The renders
    are kept as their 8-bit pixels (100 000 of 64 px: 1.2 GB, not 4.9) and read in [-1, 1] per batch."""

    def __init__(self, length: int, split: str, size: int, k: int, num_workers: int = 0):
        items = materialise(functools.partial(_world_captions_item, split, size, k), length, num_workers)
        images, self.captions, self.complete, self.foils = (list(x) for x in zip(*items))
        self.images = torch.stack(images)

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return {
            "image": self.images[i],
            "caption": self.captions[i],
            "complete": self.complete[i],
            "foils": self.foils[i],
        }


class ClipTrainable(nn.Module):
    def __init__(self, clip, hard_negative_weight: float):
        super().__init__()
        self.clip, self.hard_negative_weight = clip, hard_negative_weight

    def forward(self, batch):
        clip = self.clip
        image = F.normalize(_features(clip.get_image_features(pixel_values=batch["pixels"])), dim=-1)
        text = F.normalize(
            _features(clip.get_text_features(input_ids=batch["ids"], attention_mask=batch["mask"])), dim=-1
        )
        b = image.shape[0]
        scale = clip.logit_scale.exp().clamp(max=100)
        text_b = text[:b]
        logits = scale * image @ text_b.T
        target = torch.arange(b, device=image.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        k1 = (text.shape[0] - b) // b  # complete caption + k foils per render
        if k1 > 1 and self.hard_negative_weight:
            groups = text[b:].view(b, k1, -1)  # (B, 1+k, D), the complete caption first
            hard = scale * torch.einsum("bd,bkd->bk", image, groups)
            loss = loss + self.hard_negative_weight * F.cross_entropy(hard, torch.zeros_like(target))
        return loss


def _initial_clip(folder: str, tokenizer, image_size: int):
    """The CLIP of an earlier run's export, in fp32, checked against this run's vocabulary and render size."""
    from transformers import CLIPModel, PreTrainedTokenizerFast

    if not (Path(folder) / "config.json").is_file():
        raise ConfigError(f"model.init {folder!r} is not a CLIP folder (no config.json): give a clip run's export")
    clip = CLIPModel.from_pretrained(folder, dtype=torch.float32)
    vocab, size = clip.config.text_config.vocab_size, clip.config.vision_config.image_size
    if vocab != len(tokenizer) or size != image_size:
        raise ConfigError(
            f"model.init {folder!r} reads {vocab} words and {size} px images; this run has {len(tokenizer)} words "
            f"and data.size {image_size}: continue it at its own size"
        )
    if (Path(folder) / "tokenizer.json").is_file():  # same size is not enough: the same word must have the same id
        if PreTrainedTokenizerFast.from_pretrained(folder).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"model.init {folder!r} was trained on another vocabulary than this run's world")
    return clip


def _features(out):
    """``get_*_features`` return a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    return out if torch.is_tensor(out) else out.pooler_output


class ClipRecipe(Recipe):
    Params = ClipParams

    def __init__(self, cfg, device, rng):
        self.tokenizer = build_word_tokenizer(vocabulary())
        super().__init__(cfg, device, rng)
        m = self.params
        from transformers import CLIPModel

        self.processor = nano_image_processor(cfg.data.size)
        if m.init:
            clip = _initial_clip(m.init, self.tokenizer, cfg.data.size)
        else:
            config = nano_clip_config(
                len(self.tokenizer),
                cfg.data.size,
                m.patch_size,
                m.width,
                m.vision_layers,
                m.text_layers,
                m.heads,
                m.projection_dim,
            )
            with drawing_from(rng.cpu):
                clip = CLIPModel(config)
        self.config = clip.config
        self.trainable = ClipTrainable(clip, m.hard_negative_weight)
        self.modules = {"model": self.trainable}

    def make_dataset(self):
        d = self.cfg.data
        if d.source == "world":
            return WorldCaptions(d.length, d.split, d.size, self.params.hard_negatives, d.num_workers)
        return super().make_dataset()

    def _tokens(self, texts: list[str]):
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.processor.image_mean)[None, :, None, None]
        std = torch.tensor(self.processor.image_std)[None, :, None, None]
        return ((float_pixels(images) + 1) / 2 - mean) / std

    def prepare(self, batch, ctx):
        texts = list(batch["caption"])
        if self.params.hard_negatives and "complete" in batch:
            for complete, foils in zip(batch["complete"], batch["foils"]):
                texts += [complete, *foils]
        ids, mask = self._tokens(texts)
        return {
            "pixels": self._pixels(batch["image"]).to(self.device),
            "ids": ids.to(self.device),
            "mask": mask.to(self.device),
        }

    def step(self, modules, batch, ctx):
        return {"loss": modules["model"](batch)}

    @torch.no_grad()
    def probe(self, modules):
        n = self.params.probe_scenes
        if not n or self.cfg.data.source != "world":
            return None
        clip = modules["model"].clip
        was = clip.training
        clip.eval()
        images, texts = clip_embedders(clip, self.tokenizer, self.processor)
        report = retrieval_accuracy(images, texts, n, split="val", size=self.cfg.data.size)
        clip.train(was)
        return {"retrieval_top1": report.top1, **{f"beats_{k}": v for k, v in report.by_attribute.items()}}

    def export(self, modules, path):
        import copy

        path = Path(path)
        clip = copy.deepcopy(modules["model"].clip).eval()
        dtype = parse_dtype(self.params.export_dtype, None)
        if dtype is not None:
            clip = clip.to(dtype)
        clip.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        self.processor.save_pretrained(path)
