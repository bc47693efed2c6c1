"""Plans: one builder per task turns a request into what the one denoising path runs.

Every task (text→image, image→image, inpainting, outpainting) is the same sampling loop over the same U-Net; a
builder only decides the prompts, the resolved settings, the latent shape, the clean latent a partial run
starts from, the per-step adapters (inpainting channels; later ControlNet residuals and IP-Adapter tokens) and a
finishing step on the decoded images. :data:`TASKS` maps a request type to its builder; adding a task is one
request dataclass and one entry (docs/architecture.md has a worked example).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .diffusion.conditioning import Adapter, ExtraChannels
from .images import as_mask, as_pil, check_size, dilate_mask, fit_for_diffusion, pil_to_tensor
from .requests import GenerationSettings, ImageToImage, Inpaint, Outpaint, TextToImage


@dataclass
class Plan:
    """What :meth:`Kandinsky3.run` executes: encode the prompts, draw noise of ``shape``, sample (from
    ``init_latents`` part-way when given) with the adapters, decode, ``finish``, stamp the metadata."""

    task: str
    prompts: list[str]
    negative_prompts: list[str] | None
    settings: GenerationSettings  # resolved: no None left
    shape: tuple[int, int, int, int]
    init_latents: torch.Tensor | None = None
    adapters: list[Adapter] = field(default_factory=list)
    finish: Callable[[list[Image.Image]], list[Image.Image]] | None = None
    original_prompts: list[str] | None = None

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
    finish = (lambda images: pipe.upscale_images(images, req.upscale)) if req.upscale else None
    return Plan(
        "generate",
        prompts,
        negative_list(req.negative_prompt, prompts),
        s,
        _shape(pipe, len(prompts) * s.num_images, s.width, s.height),
        finish=finish,
        original_prompts=originals,
    )


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
            f"model's has {pipe.unet.in_channels}. Load one: Kandinsky3.from_pretrained('inpainting')"
        )
    image = as_pil(req.image)
    user_mask = as_mask(req.mask, image.size)
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


TASKS: dict[type, Callable] = {
    TextToImage: plan_text_to_image,
    ImageToImage: plan_image_to_image,
    Inpaint: plan_inpaint,
    Outpaint: plan_outpaint,
}


def inpainting_inputs(movq, image: Image.Image, mask: np.ndarray, batch: int, tiled: bool = False) -> torch.Tensor:
    """Extra channels ``[mask (1 = keep), masked-image latent]`` at latent size (spec §6).

    ``mask`` is the user's (1 = repaint) at image size; pixels where the keep-mask is not exactly 1 are zeroed
    (mid-grey) before encoding, and the mask is resized to the latent with nearest neighbours.
    """
    param = next(movq.parameters())
    keep = 1.0 - torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    pixels = pil_to_tensor(image)
    masked = pixels * (keep == 1.0)
    masked_latent = movq.encode(masked.to(param.device, param.dtype), tiled=tiled).float()
    keep_latent = F.interpolate(keep, size=masked_latent.shape[-2:]).to(masked_latent.device)
    extra = torch.cat([keep_latent, masked_latent], dim=1)
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
