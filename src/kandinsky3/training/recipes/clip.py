"""Contrastive CLIP training on the shapes world (the nano CLIP: the nano IP-Adapter's image encoder, and the
CLIP-score metric of ``kandinsky3 eval clipscore``).

A ``transformers.CLIPModel`` (``models.clip.nano_clip_config``) over nano's word-level tokenizer learns the
symmetric InfoNCE loss of CLIP on (render, caption) batches, plus a **hard-negative** term: each render also
ranks its complete caption against ``hard_negatives`` foil captions that differ in exactly one attribute (colour,
shape, size, position of one object, or the background; ``world/foils.py``). Random in-batch negatives almost never
differ in one attribute only, and telling those apart is what the IP-Adapter needs from the embedding and what the
zero-shot retrieval check measures.

**Shape prompts.** ``shape_prompt_weight`` > 0 adds CLIP's own zero-shot classification as a term: every
one-object render ranks the prompt "a <its shape>" against the other shapes' prompts. The one-attribute foils
teach the embedding to tell shapes apart *within a caption's context* — the shape direction may depend on the
colour, the position and the background — and a context-free prompt's embedding is one fixed vector, so this term
asks for shape to be readable by one linear map from the image embedding, which is what the IP-Adapter's linear
image projection can use (docs/ip_adapter.md, "Seventh runs").
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
from ...world import SHAPES, caption_scene, vocabulary
from ...world.dataset import SPLIT_SEEDS, float_pixels, pil_to_bytes, world_sample
from ...world.foils import SHAPE_PROMPTS, foil_captions, retrieval_accuracy, shape_prompt_accuracy
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
    shape_prompt_weight: float = 0.0  # one-object renders rank "a <shape>" against the other shapes (module doc)
    probe_scenes: int = 100  # zero-shot retrieval (1 true vs 7 foils) on this many val renders at sample_every
    export_dtype: str | None = "fp16"
    init: str | None = None  # a CLIP folder (an export) to continue from; its architecture replaces the sizes above

    def validate(self, cfg):
        if self.hard_negatives < 0 or self.hard_negative_weight < 0 or self.shape_prompt_weight < 0:
            raise ConfigError("model.hard_negatives, hard_negative_weight and shape_prompt_weight must be ≥ 0")
        if cfg.data.source != "world" and self.shape_prompt_weight:
            raise ConfigError(
                "shape prompts need the shapes world (data.source: world), or model.shape_prompt_weight: 0"
            )
        if cfg.data.source != "world" and self.hard_negatives:
            raise ConfigError("hard negatives need the shapes world (data.source: world), or model.hard_negatives: 0")
        if cfg.data.size % self.patch_size:
            raise ConfigError(f"data.size {cfg.data.size} is not a multiple of model.patch_size {self.patch_size}")


def _world_captions_item(split: str, size: int, k: int, i: int) -> tuple:
    s = world_sample(i, split, size)
    rng = random.Random(SPLIT_SEEDS[split] * 31 + i)
    complete = caption_scene(s.scene, rng, complete=True)  # before the foils: the order every run so far drew
    foils = [c for c, _ in foil_captions(s.scene, rng, k)] if k else []
    shape = SHAPES.index(s.scene.objects[0].shape) if len(s.scene.objects) == 1 else -1
    return pil_to_bytes(s.image), s.caption, complete, foils, shape


class WorldCaptions(torch.utils.data.Dataset):
    """Renders of a world split with their caption, complete caption and ``k`` one-attribute foils, materialised
    once (rendering costs more than a training step on a CPU), by ``num_workers`` processes when > 0. The renders
    are kept as their 8-bit pixels (100 000 of 64 px: 1.2 GB, not 4.9) and read in [-1, 1] per batch."""

    def __init__(self, length: int, split: str, size: int, k: int, num_workers: int = 0):
        items = materialise(functools.partial(_world_captions_item, split, size, k), length, num_workers)
        images, self.captions, self.complete, self.foils, shapes = (list(x) for x in zip(*items))
        self.images, self.shapes = torch.stack(images), torch.tensor(shapes)  # shape: an index of SHAPES, or -1

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return {
            "image": self.images[i],
            "caption": self.captions[i],
            "complete": self.complete[i],
            "foils": self.foils[i],
            "shape": self.shapes[i],
        }


class ClipTrainable(nn.Module):
    def __init__(self, clip, hard_negative_weight: float, shape_prompt_weight: float = 0.0):
        super().__init__()
        self.clip, self.hard_negative_weight = clip, hard_negative_weight
        self.shape_prompt_weight = shape_prompt_weight

    def _text(self, ids, mask):
        return F.normalize(_features(self.clip.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)

    def forward(self, batch):
        clip = self.clip
        image = F.normalize(_features(clip.get_image_features(pixel_values=batch["pixels"])), dim=-1)
        text = self._text(batch["ids"], batch["mask"])
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
        labels = batch.get("shape")
        if self.shape_prompt_weight and labels is not None and (labels >= 0).any():
            prompts = self._text(batch["shape_ids"], batch["shape_mask"])  # (len(SHAPES), D)
            logits = scale * image @ prompts.T
            loss = loss + self.shape_prompt_weight * F.cross_entropy(logits, labels, ignore_index=-1)
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
        self.trainable = ClipTrainable(clip, m.hard_negative_weight, m.shape_prompt_weight)
        self.shape_tokens = self._tokens(SHAPE_PROMPTS)  # the same every step
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
        out = {
            "pixels": self._pixels(batch["image"]).to(self.device),
            "ids": ids.to(self.device),
            "mask": mask.to(self.device),
        }
        if self.params.shape_prompt_weight and "shape" in batch:
            shape_ids, shape_mask = self.shape_tokens
            out.update(shape=batch["shape"].to(self.device), shape_ids=shape_ids.to(self.device),
                       shape_mask=shape_mask.to(self.device))  # fmt: skip
        return out

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
        shapes = shape_prompt_accuracy(images, texts, n, split="val", size=self.cfg.data.size)
        clip.train(was)
        by_attribute = {f"beats_{k}": v for k, v in report.by_attribute.items()}
        return {"retrieval_top1": report.top1, **by_attribute, "shape_prompt_top1": shapes}

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
