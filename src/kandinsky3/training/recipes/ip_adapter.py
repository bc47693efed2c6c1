"""IP-Adapter training (spec §8.2; issue #14): a frozen U-Net, text encoder, MoVQ and CLIP image encoder; trainable =
the image projection + every text cross-attention layer's ``to_key_ip`` / ``to_v_ip`` / ``to_out_ip``.

Each sample is (latent of a picture, its caption, the CLIP ``image_embeds`` of a reference picture). ε-MSE at a
uniform timestep with the image tokens read by the decoupled cross-attention (weight 1). Condition dropout, as
released: ``drop_image`` of the samples lose the image (→ the zero-image embedding, the unconditional image
feature), ``drop_text`` lose the text (→ the base model's null context, or all-zero context and mask with
``text: zeros``), ``drop_both`` lose both. AdamW, lr 1e-4, weight decay 0.01 (the released setting; the nano
config uses a higher lr).

**References.** With ``reference: same`` the embedding is the training picture's own (the released recipe). On the
shapes world ``reference: new_background`` renders the same objects (colour, shape, size, position) on another
background: the adapter then carries the *objects* and leaves the background to the text — what a variation and an
"image + this background" request need — instead of learning to copy the picture. ``background_caption`` of the
samples with an image keep only the caption's background phrase (the image + text case: the text names what the
picture does not say).

**Teacher target.** ``teacher_target`` λ > 0 takes that share of the ε target of every sample with an image from the
frozen U-Net itself, run on the same x_t with the picture's full caption and no image: target = ε + λ·(ε_text − ε).
What the adapter has to learn is what the words would have done, so the text-conditioned prediction is the
quantity its tokens stand in for; as a regression target it has the ε-loss's minimiser (when the U-Net is right)
without the variance of the drawn noise, which on 8×8 latents buries the few latent pixels that carry a small
object's shape. It costs one gradient-free U-Net forward a step.

**Noisy steps.** ``x0_weight_cap`` c weights each sample's loss by min(1/SNR(t), c) (the x0-MSE, capped). The text's
own effect on ε — what the image tokens stand in for — is ~100× smaller at t ≥ 800 than at t < 200, so under the
plain ε loss the steps that lay out the object's shape carry almost nothing; measured on nano (adapter v16, 192
val references) the tokens reproduced 28 % of it there for small objects, against ≈ 80 % at 200 ≤ t < 800.
Weighted with c = 10 they reproduced 36 %, and the variation measure did not move (docs/ip_adapter.md, "Ninth run").
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ...checkpoints.io import CheckpointError
from ...checkpoints.ip_adapter import IPAdapterParts, check_sampling, load_image_encoder, save_ip_adapter
from ...checkpoints.loading import parse_dtype
from ...diffusion import NoiseSchedule
from ...models.config import ConfigError
from ...models.ip_adapter import IPAdapter, IPAdapterConfig
from ...models.seeding import drawing_from
from ...world import BACKGROUNDS, caption_scene, render
from ...world.captions import BACKGROUND_TEMPLATES
from ...world.dataset import SPLIT_SEEDS, float_pixels, makes_twins, pil_to_bytes, world_sample
from ...world.judge import judge
from ..data import materialise
from ..object_weighting import batch_pixel_weight, check_object_weight, object_coverage, weighted_square_error
from .base import Recipe, image_grid, load_frozen
from .diffusion import x0_weight

REFERENCES = ("same", "new_background")
TEXT_MODES = ("null", "zeros")


@dataclass
class IPAdapterParams:
    """``model:`` of the ip_adapter recipe."""

    base: str = "nano"  # the frozen model (U-Net, text encoder, MoVQ): a registered name or a model folder
    image_encoder: str = "nano-clip"  # the frozen CLIP: a registered name, a folder or a hub id
    name: str = "custom-ip-adapter"
    num_tokens: int = 4
    text: str = "null"  # what dropped text becomes: the base model's null context, or zeros (released pipeline)
    drop_image: float = 0.05
    drop_text: float = 0.05
    drop_both: float = 0.05
    reference: str = "same"  # same | new_background (world only)
    background_caption: float = 0.0  # world: fraction of image samples whose caption keeps only the background
    init: str | None = None  # an adapter folder to continue from
    init_from_text: bool = False  # image keys/values start as copies of the text ones (the IP-Adapter paper's init)
    object_weight: float = 1.0  # world: an object's latent pixels count this many times a background one
    teacher_target: float = 0.0  # share of the ε target from the frozen U-Net with the full caption (module doc)
    x0_weight_cap: float | None = None  # weight the ε-MSE by min(1/SNR, cap): the noisy steps count (module doc)
    export_dtype: str | None = None
    sampling: dict | None = None  # the export's own sampler settings {early_boost, early_fraction} (docs/ip_adapter)
    probe_references: int = 24  # variation probe (judge) on this many val references at sample_every (0: none)

    def validate(self, cfg):
        for name in ("drop_image", "drop_text", "drop_both", "background_caption", "teacher_target"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"model.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.drop_image + self.drop_text + self.drop_both > 1:
            raise ConfigError("model.drop_image + drop_text + drop_both must be ≤ 1")
        if self.reference not in REFERENCES:
            raise ConfigError(f"model.reference must be one of {REFERENCES}, got {self.reference!r}")
        check_object_weight(self.object_weight)
        if self.x0_weight_cap is not None and not self.x0_weight_cap > 0:
            raise ConfigError(f"model.x0_weight_cap must be > 0 (or null: no weighting), got {self.x0_weight_cap}")
        if self.text not in TEXT_MODES:
            raise ConfigError(f"model.text must be one of {TEXT_MODES}, got {self.text!r}")
        if self.sampling is not None:
            try:
                check_sampling(self.sampling, "model.sampling")
            except CheckpointError as exc:
                raise ConfigError(str(exc)) from None
        if cfg.data.source != "world" and (self.reference != "same" or self.background_caption):
            raise ConfigError("model.reference: new_background and model.background_caption need data.source: world")


def new_background(scene, rng: random.Random):
    """The same objects on another background that differs from every object's colour."""
    used = {o.color for o in scene.objects} | {scene.background}
    return replace(scene, background=rng.choice([b for b in BACKGROUNDS if b not in used]))


def background_phrase(background: str, rng: random.Random) -> str:
    template = rng.choice(BACKGROUND_TEMPLATES).lstrip(", ")
    return template.format(background)


def _world_references_item(split, size, reference, object_counts, complete_captions, twins_share, i) -> tuple:
    count = object_counts[i % len(object_counts)] if object_counts else None
    s = world_sample(i, split, size, count, complete_captions, makes_twins(i, twins_share))
    rng = random.Random(SPLIT_SEEDS[split] * 17 + i)
    ref = s.image if reference == "same" else render(new_background(s.scene, rng), size).image
    return pil_to_bytes(s.image), pil_to_bytes(ref), s.caption, background_phrase(s.scene.background, rng)


class WorldReferences(torch.utils.data.Dataset):
    """World renders with their caption, a background-only caption and a reference render (itself, or the same
    objects on another background), materialised once, by ``num_workers`` processes when > 0. The renders are kept
    as their 8-bit pixels (a quarter of float32: 120 000 scenes and references in 2.9 GB, not 11.8) and read in
    [-1, 1] per item, exactly as ``to_tensor`` reads the render."""

    def __init__(
        self,
        length: int,
        split: str,
        size: int,
        reference: str,
        object_counts: tuple[int, ...] | None = None,
        complete_captions: bool = False,
        twins_share: float = 0.0,
        num_workers: int = 0,
    ):
        make = functools.partial(
            _world_references_item, split, size, reference, object_counts, complete_captions, twins_share
        )
        images, refs, self.captions, self.backgrounds = (list(x) for x in zip(*materialise(make, length, num_workers)))
        self.tensors = {"image": torch.stack(images), "reference": torch.stack(refs)}

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return {
            "caption": self.captions[i],
            "background_caption": self.backgrounds[i],
            **{k: float_pixels(v[i]) if k in ("image", "reference") else v[i] for k, v in self.tensors.items()},
        }


class IPTrainable(nn.Module):
    """The trainable adapter; the frozen U-Net borrows its layers (``IPAdapter.attach``)."""

    def __init__(self, adapter: IPAdapter):
        super().__init__()
        self.adapter = adapter


class IPAdapterRecipe(Recipe):
    Params = IPAdapterParams

    def __init__(self, cfg, device, rng):
        super().__init__(cfg, device, rng)
        p = self.params
        base = load_frozen(p.base, device)
        self.base_variant, self.unet, self.movq, self.text = base.variant, base.unet, base.movq, base.text_encoder
        self.encoder = load_image_encoder(p.image_encoder, device=device)
        self.schedule = NoiseSchedule.named("cosine")
        config = IPAdapterConfig(self.encoder.embed_dim, p.num_tokens, self.unet.config)
        with drawing_from(rng.cpu):
            adapter = IPAdapter(config)
        if p.init_from_text:
            adapter.init_from_text_path(self.unet)
        if p.init:
            from ...checkpoints.ip_adapter import build_ip_adapter, read_ip_adapter, resolve_folder

            adapter.load_state_dict(
                build_ip_adapter(read_ip_adapter(resolve_folder(p.init)), self.unet.config).state_dict()
            )
        self.trainable = IPTrainable(adapter.to(device).train())
        self.trainable.adapter.attach(self.unet)
        self.modules = {"model": self.trainable}
        self.zero_embedding = self.encoder.zero_embedding().to(device)
        self._cache()

    @classmethod
    def reads_plain_world_data(cls) -> bool:
        return True  # WorldReferences reads data.object_counts, complete_captions, twins_share as the world data does

    def make_dataset(self):
        d, p = self.cfg.data, self.params
        if d.source == "world":
            return WorldReferences(
                d.length,
                d.split,
                d.size,
                p.reference,
                d.object_counts,
                d.complete_captions,
                d.twins_share,
                d.num_workers,
            )
        return super().make_dataset()

    @torch.no_grad()
    def _cache(self):
        """Encode an in-memory dataset once: MoVQ latents of the pictures, CLIP embeddings of the references."""
        tensors = getattr(self.dataset, "tensors", None)
        if tensors is None or "image" not in tensors:
            return
        images = tensors.pop("image")
        refs = tensors.pop("reference", images)
        latents, embeds, objects = [], [], []
        from tqdm.auto import tqdm

        for chunk in tqdm(range(0, len(images), 256), desc="encoding", leave=False):
            part = float_pixels(images[chunk : chunk + 256])
            if self.params.object_weight != 1:
                objects.append(object_coverage(part, self.base_variant.movq.downsample_factor))
            latents.append(self.movq.encode_untiled(part.to(self.device)).float().cpu())
            embeds.append(self._embed(float_pixels(refs[chunk : chunk + 256])).cpu())
        if objects:
            tensors["objects"] = torch.cat(objects)
        tensors["latents"], tensors["embeds"] = torch.cat(latents), torch.cat(embeds)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pictures in [-1, 1] → CLIP image_embeds (resized bicubically to the encoder's size if needed)."""
        images = images.to(self.device).float()
        size = self.encoder.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
        return self.encoder(self.encoder.normalize(images.clamp(-1, 1)))

    def prepare(self, batch, ctx):
        p = self.params
        n = len(batch["caption"])
        g = ctx.generator("cpu")
        u = torch.rand(n, generator=g)
        drop_image = u < p.drop_image
        drop_text = (u >= p.drop_image) & (u < p.drop_image + p.drop_text)
        drop_both = (u >= p.drop_image + p.drop_text) & (u < p.drop_image + p.drop_text + p.drop_both)
        short = (torch.rand(n, generator=g) < p.background_caption) & ~drop_image & ~drop_both
        captions = [
            b if s else c for c, b, s in zip(batch["caption"], batch.get("background_caption", batch["caption"]), short)
        ]
        ids, mask = self.text.tokenize(captions)
        if "latents" in batch:
            latents, embeds = batch["latents"].to(self.device), batch["embeds"].to(self.device)
        else:
            with torch.no_grad():
                latents = self.movq.encode(batch["image"].to(self.device)).float()
                embeds = self._embed(batch["image"])
        out = {
            "ids": ids.to(self.device),
            "mask": mask.to(self.device),
            "latents": latents,
            "embeds": embeds,
            "no_image": (drop_image | drop_both).to(self.device),
            "no_text": (drop_text | drop_both).to(self.device),
        }
        if p.teacher_target:
            full_ids, full_mask = self.text.tokenize(list(batch["caption"]))
            out["teacher_ids"], out["teacher_mask"] = full_ids.to(self.device), full_mask.to(self.device)
        if p.object_weight != 1:
            factor = self.base_variant.movq.downsample_factor
            out["pixel_weight"] = batch_pixel_weight(batch, factor, p.object_weight, self.device)
        return out

    def step(self, modules, batch, ctx):
        adapter = modules["model"].adapter
        latents = batch["latents"]
        with torch.no_grad():
            context, mask, lengths = self._encode(batch["ids"], batch["mask"])
            if self.params.text == "null":
                empty, empty_mask = self.text.null_context(context)
            else:
                empty, empty_mask = torch.zeros_like(context), torch.zeros_like(mask)
            no_text = batch["no_text"]
            context = torch.where(no_text[:, None, None], empty, context)
            mask = torch.where(no_text[:, None], empty_mask, mask)
        embeds = torch.where(
            batch["no_image"][:, None], self.zero_embedding.expand_as(batch["embeds"]), batch["embeds"]
        )
        tokens = adapter.image_tokens(embeds)
        g = ctx.generator(self.device)
        t = torch.randint(0, self.schedule.num_timesteps, (latents.shape[0],), device=latents.device, generator=g)
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=g)
        x_t = self.schedule.q_sample(latents, t, noise)
        eps = self.unet(x_t, t.float(), context, mask, None, lengths, image_tokens=tokens, image_weight=1.0)
        loss = weighted_square_error(eps, self._target(x_t, t, noise, batch), batch).mean(dim=(1, 2, 3))
        if self.params.x0_weight_cap:
            loss = loss * x0_weight(self.schedule.abar_per_sample(t), self.params.x0_weight_cap)
        return {"loss": loss.mean()}

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor):
        context, mask = self.text.encode_ids(ids, mask)
        return context, mask, self.text.prompt_lengths(mask)

    @torch.no_grad()
    def _target(self, x_t, t, noise, batch) -> torch.Tensor:
        """The ε target: the drawn noise, moved ``teacher_target`` of the way to the frozen U-Net's own prediction
        with the full caption and no image, for the samples that have an image."""
        share = self.params.teacher_target
        if not share:
            return noise
        context, mask, lengths = self._encode(batch["teacher_ids"], batch["teacher_mask"])
        teacher = self.unet(x_t, t.float(), context, mask, None, lengths).float()
        weight = share * (~batch["no_image"]).to(noise.dtype)[:, None, None, None]
        return noise + weight * (teacher - noise)

    # -- sampling with the (EMA) adapter ---------------------------------------------------------------------------

    def pipeline(self, adapter: IPAdapter):
        from ...checkpoints.loading import Components
        from ...pipeline import Kandinsky3

        pipe = Kandinsky3(Components(self.base_variant, self.unet, self.movq, self.text), device=self.device)
        adapter.attach(self.unet)
        pipe.ip_adapter = IPAdapterParts(adapter, self.encoder, self.params.text, self.params.name)
        return pipe

    def _with(self, modules, fn):
        adapter = modules["model"].adapter
        was = adapter.training
        adapter.eval()
        try:
            return fn(self.pipeline(adapter))
        finally:
            adapter.train(was)
            self.trainable.adapter.attach(self.unet)  # the training copy again (the EMA copy was lent for sampling)

    @torch.no_grad()
    def sample_grid(self, modules):
        refs = [world_sample(i, "val", self.cfg.data.size, num_objects=1 + i % 2).image for i in range(4)]

        def grid(pipe):
            rows = [refs]
            for seed in (0, 1):
                rows.append([pipe.variation(r, seed=seed, steps=25, progress=False)[0] for r in refs])
            return image_grid(rows)

        return self._with(modules, grid)

    @torch.no_grad()
    def probe(self, modules):
        """Variation probe: the judge finds the reference's colour and shape (and position) in the output."""
        n = self.params.probe_references
        if not n or self.cfg.data.source != "world":
            return None
        samples = [world_sample(i, "val", self.cfg.data.size, num_objects=1) for i in range(n)]

        def run(pipe):
            kept = placed = 0
            for s in samples:
                image = pipe.variation(s.image, seed=0, steps=25, progress=False)[0]
                obj = s.scene.objects[0]
                v = judge(image, f"a {obj.color} {obj.shape}").objects[0]
                kept += bool(v.color and v.shape)
                placed += bool(
                    judge(image, caption_scene(replace(s.scene, objects=(obj,)), random.Random(0), complete=True))
                    .objects[0]
                    .position
                )
            return {"variation_color_shape": kept / n, "variation_position": placed / n}

        return self._with(modules, run)

    def export(self, modules, path):
        adapter = modules["model"].adapter
        save_ip_adapter(
            adapter,
            Path(path),
            name=self.params.name,
            text=self.params.text,
            image_encoder=self.params.image_encoder,
            dtype=parse_dtype(self.params.export_dtype, None),
            sampling=self.params.sampling,
        )
