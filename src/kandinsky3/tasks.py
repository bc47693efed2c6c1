"""Plans: one builder per task turns a request into what the one denoising path runs.

Every task (text→image, image→image, inpainting, outpainting) is the same sampling loop over the same U-Net; a
builder only decides the prompts, the resolved settings, the latent shape, the clean latent a partial run
starts from, the per-step adapters (inpainting channels; later ControlNet residuals and IP-Adapter tokens) and a
finishing step on the decoded images. :data:`TASKS` maps a request type to its builder; adding a task is one
request dataclass and one entry (docs/architecture.md has a worked example).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .diffusion.conditioning import Adapter, ExtraChannels
from .diffusion.inpainting import REPAINT_THRESHOLD, inpainting_channels
from .diffusion.steps import run_length, steps_in
from .images import as_mask, as_pil, check_size, dilate_mask, fit_for_diffusion, pil_to_tensor
from .requests import (
    Control,
    GenerationSettings,
    ImagePromptSettings,
    ImageToImage,
    Inpaint,
    Mix,
    Outpaint,
    TextToImage,
    Variation,
)


@dataclass
class Plan:
    """What :meth:`Kandinsky3.run` executes: encode the prompts, draw noise of ``shape``, sample (from
    ``init_latents`` part-way when given) with the adapters, decode, ``finish``, upscale, stamp the metadata."""

    task: str
    prompts: list[str]
    negative_prompts: list[str] | None
    settings: GenerationSettings  # resolved: no None left
    shape: tuple[int, int, int, int]
    init_latents: torch.Tensor | None = None
    adapters: list[Adapter] = field(default_factory=list)
    finish: Callable[[list[Image.Image]], list[Image.Image]] | None = None
    original_prompts: list[str] | None = None
    images: list[Image.Image] | None = None  # the result when there is nothing to sample (an empty inpainting mask)
    metadata: dict = field(default_factory=dict)  # the task's own settings, stamped on every image (as resolved)
    upscale: int | None = None  # chain the upscaler (2 or 4) on the finished images, with the run's progress setting

    @property
    def batch_size(self) -> int:
        return self.shape[0]


def prompt_list(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompt must be a string or a non-empty list of strings")
    return prompts


def negative_list(negative, prompts: list[str]) -> list[str] | None:
    if isinstance(negative, str):
        return [negative] * len(prompts)
    if negative is not None and len(negative) != len(prompts):
        raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one, or one each")
    return None if negative is None else list(negative)


def _resolve(pipe, request, **overrides) -> GenerationSettings:
    return GenerationSettings(**{**request.to_dict(), **overrides}).resolve(pipe.variant)


def _shape(pipe, batch: int, width: int, height: int) -> tuple[int, int, int, int]:
    f = pipe.latent_factor
    return (batch, pipe.latent_channels, height // f, width // f)


def plan_text_to_image(pipe, req: TextToImage) -> Plan:
    s = _resolve(pipe, req)
    check_size(s.width, s.height, pipe.size_multiple)
    prompts = prompt_list(req.prompt)
    originals = None
    if req.beautify:
        originals = prompts
        prompts = [pipe.beautify(p, req.beautify).prompt for p in prompts]
    plan = Plan(
        "generate",
        prompts,
        negative_list(req.negative_prompt, prompts),
        s,
        _shape(pipe, len(prompts) * s.num_images, s.width, s.height),
        upscale=req.upscale,
        original_prompts=originals,
    )
    if req.image is not None:  # image + text (IP-Adapter): one image for every prompt, or one per prompt
        images = _image_list(req.image)
        if len(images) not in (1, len(prompts)):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts: give one image, or one per prompt")
        embeds, zero = image_embeddings(pipe, images)
        repeat = s.num_images * (len(prompts) if len(images) == 1 else 1)
        empty = all(p == "" for p in prompts) and plan.negative_prompts is None
        add_image_prompt(plan, pipe, embeds, zero, req, repeat, empty)
    return plan


def prepare_image(image, width: int | None, height: int | None, max_side: int, multiple: int) -> Image.Image:
    """Resize to the requested size, or (official) to ≈ max_side² pixels with sides floored to ``multiple``."""
    image = as_pil(image)
    if width is None and height is None:
        width, height = fit_for_diffusion(image.width, image.height, max_side, multiple)
    else:
        width, height = width or image.width, height or image.height
        check_size(width, height, multiple)
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC, reducing_gap=None)
    return image


def plan_image_to_image(pipe, req: ImageToImage) -> Plan:
    image = prepare_image(req.image, req.width, req.height, pipe.variant.size, pipe.size_multiple)
    s = _resolve(pipe, req, width=image.width, height=image.height)
    prompts = prompt_list(req.prompt)
    batch = len(prompts) * s.num_images
    latents = pipe.encode_image(image).expand(batch, -1, -1, -1)
    return Plan(
        "edit", prompts, negative_list(req.negative_prompt, prompts), s, tuple(latents.shape), init_latents=latents
    )


def plan_inpaint(pipe, req: Inpaint, task: str = "inpaint") -> Plan:
    if not pipe.is_inpainting:
        raise ValueError(
            f"inpainting needs a U-Net with {2 * pipe.latent_channels + 1} input channels; this "
            f"model's has {pipe.unet.in_channels}. Load one: Kandinsky3.from_pretrained('inpainting') "
            "(CLI: --model inpainting) or an inpainting model folder you trained (docs/inpainting.md)"
        )
    image = as_pil(req.image)
    # soft or noisy masks are made binary: ≥ 0.5 (grey 128 of 255 and above) is repainted
    user_mask = (as_mask(req.mask, image.size) >= REPAINT_THRESHOLD).astype(np.float32)
    if req.dilate:
        user_mask = dilate_mask(user_mask)
    width, height = req.width, req.height
    if width is None and height is None:
        width, height = fit_for_diffusion(image.width, image.height, pipe.variant.size, pipe.size_multiple)
    check_size(width, height, pipe.size_multiple)
    s = _resolve(pipe, req, width=width, height=height)
    resized = image.resize((width, height), Image.BICUBIC) if image.size != (width, height) else image
    m = resize_mask(user_mask, image.size, (width, height))
    prompts = prompt_list(req.prompt)
    batch = len(prompts) * s.num_images
    if not user_mask.any():  # nothing to repaint: the input (at the output size), no sampling
        warnings.warn("the mask is empty (nothing to repaint): the input is returned unchanged", stacklevel=4)
        return Plan(task, prompts, None, s, _shape(pipe, batch, width, height), images=[resized.copy()] * batch)
    with pipe.placed(pipe.movq):
        extra = inpainting_inputs(pipe.movq, resized, m, batch, pipe.movq_tiling)
    finish = (lambda images: paste_back(images, resized, m)) if req.paste_back else None
    return Plan(
        task,
        prompts,
        negative_list(req.negative_prompt, prompts),
        s,
        _shape(pipe, batch, width, height),
        adapters=[ExtraChannels(extra)],
        finish=finish,
    )


def plan_outpaint(pipe, req: Outpaint) -> Plan:
    canvas, mask = outpaint_canvas(req.image, req.left, req.right, req.top, req.bottom, pipe.size_multiple)
    inpaint = Inpaint(
        **{k: v for k, v in req.to_dict().items() if k not in ("width", "height", "strength")},
        image=canvas,
        mask=mask,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        dilate=req.dilate,
        paste_back=req.paste_back,
        width=canvas.width,
        height=canvas.height,
    )
    return plan_inpaint(pipe, inpaint, task="inpaint")


def paste_back(images: list[Image.Image], original: Image.Image, mask: np.ndarray) -> list[Image.Image]:
    """Put the original pixels back where ``mask`` (1 = repaint) is 0, blending where it is fractional."""
    keep = (1.0 - mask)[..., None]
    orig = np.asarray(original, dtype=np.float32)
    out = []
    for im in images:
        new = Image.fromarray((np.asarray(im, np.float32) * (1 - keep) + orig * keep).round().astype(np.uint8))
        new.info.update(im.info)
        out.append(new)
    return out


def control_hint(
    image, width: int, height: int, is_edges: bool, method: str = "soft", hed_weights=None
) -> torch.Tensor:
    """The ControlNet's hint (1, 3, height, width) in [0, 1]: the image (any mode; grey / RGBA converted) resized
    to the output size (bicubic), then its edges by ``method`` (soft: what the nano ControlNet was trained on;
    hed: the released one's) unless it is an edge map already (``is_edges``)."""
    from .edges import extract_edges, image_to_unit

    image = as_pil(image)
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC, reducing_gap=None)
    return image_to_unit(image if is_edges else extract_edges(image, method, hed_weights))


def plan_control(pipe, req: Control) -> Plan:
    """ControlNet (spec §8.4): text→image (or image→image from ``init_image``) with the ControlNet's residuals
    added to the U-Net's skips at every step of the control window (:class:`~.diffusion.control.ControlAdapter`)."""
    from .diffusion.control import ControlAdapter

    if pipe.is_inpainting:
        raise ValueError("ControlNet runs beside a text→image U-Net (base, flash, nano), not an inpainting one")
    prompts = prompt_list(req.prompt)
    images = list(req.image) if isinstance(req.image, (list, tuple)) else [req.image]
    if len(images) not in (1, len(prompts)):
        raise ValueError(f"{len(images)} control images for {len(prompts)} prompts: give one, or one per prompt")
    hint_image = as_pil(images[0])
    width, height = req.width, req.height
    if width is None and height is None:
        width, height = fit_for_diffusion(hint_image.width, hint_image.height, pipe.variant.size, pipe.size_multiple)
    width, height = width or hint_image.width, height or hint_image.height
    check_size(width, height, pipe.size_multiple)
    s = _resolve(pipe, req, width=width, height=height)
    batch = len(prompts) * s.num_images
    controlnet = pipe.get_controlnet()
    method = req.edges or getattr(controlnet, "hint_method", "soft")
    if req.hed_weights is not None and method != "hed" and not req.hint_is_edges:
        raise ValueError(f"hed_weights is only used with edges='hed'; this ControlNet extracts {method} edges")
    hints = torch.cat(
        [
            control_hint(im, width, height, req.hint_is_edges, method, req.hed_weights)
            for im in [hint_image, *images[1:]]
        ]
    )
    if len(images) > 1:  # one hint per prompt: rows follow the prompts' order (repeat_interleave, as the text)
        hints = hints.repeat_interleave(s.num_images, dim=0)
    init = None
    if req.init_image is not None:
        init_image = prepare_image(req.init_image, width, height, pipe.variant.size, pipe.size_multiple)
        init = pipe.encode_image(init_image).expand(batch, -1, -1, -1)
    scale = req.scale
    if not isinstance(scale, (int, float)):
        scale = torch.as_tensor(np.asarray(scale, dtype=np.float32))
    adapter = ControlAdapter(
        controlnet,
        hints,
        scale,
        req.start,
        req.end,
        run_length(s.sampler, s.steps, s.strength if init is not None else 1.0),
    )
    return Plan(
        "control",
        prompts,
        negative_list(req.negative_prompt, prompts),
        s,
        _shape(pipe, batch, width, height),
        init_latents=init,
        adapters=[adapter],
    )


def image_embeddings(pipe, images) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP ``image_embeds`` of ``images`` (K, D) and of the all-zero normalised image (1, D), the unconditional
    image feature (spec §8.2); any image mode is converted to RGB first (:func:`~.images.as_pil`). Each image is
    encoded alone: a batch changes the last bits of CPU matmuls, and an image's embedding must not depend on the
    images beside it (mixing with weights (1, 0) equals the single image exactly)."""
    parts = pipe.get_ip_adapter()
    pictures = [as_pil(im) for im in images]
    with pipe.placed(parts.encoder):
        embeds = torch.cat([parts.encoder.encode([p]) for p in pictures])
        return embeds, parts.encoder.zero_embedding()


def add_image_prompt(plan: Plan, pipe, embeds, zero, req: ImagePromptSettings, repeat: int, empty_text: bool):
    """Add the IP-Adapter's per-step adapter (spec §8.2) to ``plan``: image tokens of each row of ``embeds`` (each
    repeated ``repeat`` times, the images of one prompt) for ``cond``, the zero-image embedding's for ``uncond``, at
    the request's image weight, boosted over the first steps as the request (or else the adapter) says; the
    resolved settings and the adapter's name go into the images' metadata. The text
    branches follow the adapter's training: ``zeros`` (released) gives the unconditional branch — and an empty
    prompt's conditional one — an all-zero context and mask; ``null`` (nano) gives an empty prompt the null context
    in both branches (the unconditional one has it already). Built for any guidance (the released pipeline skipped
    the image features at guidance ≤ 1)."""
    from .diffusion.image_prompt import ImagePrompt

    parts = pipe.get_ip_adapter()
    adapter = parts.adapter
    device = adapter.image_proj.weight.device
    with torch.no_grad():
        tokens = adapter.image_tokens(embeds.to(device)).repeat_interleave(repeat, dim=0)
        uncond = adapter.image_tokens(zero.to(device)).expand(tokens.shape[0], -1, -1)
    null = pipe.text_encoder.null_embedding
    if parts.text == "zeros" or null is None:
        text = {"uncond": "zeros", **({"cond": "zeros"} if empty_text else {})}
    else:
        text = {"cond": null, "uncond": null} if empty_text else {}
    weight = torch.full((tokens.shape[0],), float(req.image_weight))
    boost = parts.setting("early_boost", req.early_boost)
    fraction = parts.setting("early_fraction", req.early_fraction)
    if req.early_boost not in (None, 1) and req.early_fraction is None and fraction == 0:
        raise ValueError(
            f"early_boost {req.early_boost:g} would apply to no step: the {parts.name} adapter records no "
            "early_fraction, so give one (--early-fraction, e.g. 0.4)"
        )
    s = plan.settings
    boost_steps = steps_in(run_length(s.sampler, s.steps), fraction)
    prompt = ImagePrompt(tokens, uncond, weight, text, module=adapter, boost=boost, boost_steps=boost_steps)
    plan.adapters.append(prompt)
    plan.metadata.update(
        ip_adapter=parts.name, image_weight=float(req.image_weight), early_boost=boost, early_fraction=fraction
    )


def _image_list(image) -> list:
    return list(image) if isinstance(image, (list, tuple)) else [image]


def plan_variation(pipe, req: Variation) -> Plan:
    """Variations of a picture (or of each of a list: ``num_images`` each): image tokens only, the empty prompt's
    text branch as the adapter was trained."""
    s = _resolve(pipe, req)
    check_size(s.width, s.height, pipe.size_multiple)
    images = _image_list(req.image)
    plan = Plan("variation", [""] * len(images), None, s, _shape(pipe, len(images) * s.num_images, s.width, s.height))
    embeds, zero = image_embeddings(pipe, images)
    add_image_prompt(plan, pipe, embeds, zero, req, s.num_images, True)
    return plan


def plan_mix(pipe, req: Mix) -> Plan:
    """Mixing pictures: one image prompt from Σ wᵢ·CLIP(imageᵢ) (or the ``mean`` rule), with optional text."""
    from .diffusion.image_prompt import mix_embeddings

    s = _resolve(pipe, req)
    check_size(s.width, s.height, pipe.size_multiple)
    plan = Plan("mix", [req.prompt], None, s, _shape(pipe, s.num_images, s.width, s.height))
    embeds, zero = image_embeddings(pipe, list(req.images))
    mixed = mix_embeddings(embeds, req.resolved_weights(), req.mix_rule)
    add_image_prompt(plan, pipe, mixed, zero, req, s.num_images, req.prompt == "")
    return plan


TASKS: dict[type, Callable] = {
    TextToImage: plan_text_to_image,
    ImageToImage: plan_image_to_image,
    Inpaint: plan_inpaint,
    Outpaint: plan_outpaint,
    Control: plan_control,
    Variation: plan_variation,
    Mix: plan_mix,
}


def inpainting_inputs(movq, image: Image.Image, mask: np.ndarray, batch: int, tiled: bool = False) -> torch.Tensor:
    """Extra channels ``[mask (1 = keep), masked-image latent]`` at latent size (spec §6), by the one builder that
    training uses too (:func:`~kandinsky3.diffusion.inpainting.inpainting_channels`).

    ``mask`` is the user's (1 = repaint) at image size; pixels where the keep-mask is not exactly 1 are zeroed
    (mid-grey) before encoding, and the mask is resized to the latent with nearest neighbours.
    """
    param = next(movq.parameters())
    repaint = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    extra = inpainting_channels(
        lambda masked: movq.encode(masked.to(param.device, param.dtype), tiled=tiled), pil_to_tensor(image), repaint
    )
    return extra.expand(batch, -1, -1, -1)


def resize_mask(mask, image_size: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """Check the mask against the original image size, then resize it (bilinear, like skimage) to ``target``."""
    m = as_mask(mask, image_size)
    if m.shape[::-1] != tuple(target):
        t = torch.from_numpy(m)[None, None]
        m = F.interpolate(t, size=(target[1], target[0]), mode="bilinear", align_corners=False)[0, 0].numpy()
    return m


def outpaint_canvas(
    image, left: int, right: int, top: int, bottom: int, multiple: int
) -> tuple[Image.Image, np.ndarray]:
    """Extend the canvas by the given margins (rounded up so each side is a multiple of ``multiple``).

    The new border is filled by edge replication (a neutral start for the masked latent) and marked 1 (repaint)
    in the returned mask; the original pixels are marked 0 (keep).
    """
    image = as_pil(image)  # the margins were validated by the Outpaint request
    w, h = image.width + left + right, image.height + top + bottom
    extra_w, extra_h = (-w) % multiple, (-h) % multiple
    right, bottom = right + extra_w, bottom + extra_h
    arr = np.asarray(image)
    padded = np.pad(arr, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.ones(padded.shape[:2], dtype=np.float32)
    mask[top : top + image.height, left : left + image.width] = 0.0
    return Image.fromarray(padded), mask
