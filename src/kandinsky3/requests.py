"""Requests: one frozen dataclass per task, the single description of its arguments.

The Python API takes them (``Kandinsky3.run(request)``; ``generate`` / ``edit`` / … build one), the CLI derives its
subcommands' options from their fields (names, types, defaults, help: ``cli.py``), and a service can derive its
schemas from them. Validation that needs no model lives here, once: a request that constructs is well-formed.
Checks that need the model (size multiples, the mask against the image) happen when the request is planned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from .diffusion.image_prompt import check_image_prompt
from .diffusion.sampling import SAMPLERS
from .diffusion.steps import check_fraction
from .images import PIXEL_ROUNDING
from .registry import VARIANTS, Variant

DEFAULT_GUIDANCE = 3.0  # the official T2I w, used when a Flash variant is run with a guided sampler
MAX_SEED = 2**63 - 1


def _multiple(name: str) -> int:
    """A registered variant's size multiple: MoVQ downsampling × U-Net downsampling (``Kandinsky3.size_multiple``)."""
    v = VARIANTS[name]
    return v.movq.downsample_factor * v.unet.downsample_factor


_GUIDANCE_DEFAULTS = f"{VARIANTS['base'].sampler.guidance} for base, {VARIANTS['nano'].sampler.guidance} for nano"
_SIZE_HELP = (
    f"pixels, a multiple of {_multiple('base')} ({_multiple('nano')} for nano) (default: the model's size, "
    f"{VARIANTS['base'].size} for base, {VARIANTS['nano'].size} for nano; from an input picture: its aspect ratio "
    "at about the model's pixel count)"
)


def parse_beautify(spec: str) -> tuple[str, str | None]:
    """A ``beautify`` string → (``"template"`` | ``"local"`` | ``"server"``, the server's URL or None); anything
    else is refused naming the forms (:func:`kandinsky3.prompts.make_beautifier` builds the backend)."""
    if spec in ("template", "local"):
        return spec, None
    words = spec.split(maxsplit=1)
    url = words[1] if len(words) == 2 and words[0] == "server" else spec
    if url.startswith(("http://", "https://")):
        return "server", url
    raise ValueError(
        f"beautify must be template, local or an LLM server's http(s) URL (also as 'server URL'), not {spec!r} "
        "(--beautify with no value: the model's own)"
    )


def option(help: str, **cli) -> dict:
    """Field metadata: the help text, plus argparse extras (``positional``, ``choices``, ``nargs``, ``const``)."""
    return {"help": help, "cli": cli}


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """Sampling settings shared by every task; ``None`` means "the variant's default" (see :meth:`resolve`).

    These fields (not the task's own inputs) are what every image's PNG metadata records."""

    steps: int | None = field(default=None, metadata=option("denoising steps (default: the model's; 4 for Flash)"))
    guidance: float | None = field(
        default=None,
        metadata=option(
            "guidance weight w: ε = (w+1)·ε_cond − w·ε_uncond; 0 disables guidance (default: the model's, "
            f"{_GUIDANCE_DEFAULTS})"
        ),
    )
    width: int | None = field(default=None, metadata=option(_SIZE_HELP))
    height: int | None = field(default=None, metadata=option(_SIZE_HELP))
    num_images: int = field(default=1, metadata=option("images per prompt"))
    seed: int | list[int] | None = field(
        default=None,
        metadata=option(
            "random seed (default: random, stored in the PNG); several seeds: one per image, so image k can be "
            "regenerated alone",
            nargs="+",
        ),
    )
    sampler: str | None = field(
        default=None,
        metadata=option(
            "k3 (official DDIM-η), flash (4 re-noised steps), or a diffusers scheduler (default: the model's)",
            choices=tuple(SAMPLERS),
        ),
    )
    eta: float | None = field(default=None, metadata=option("k3 sampler: η scales the step variance (default 1)"))
    threshold_percentile: float | None = field(
        default=None,
        metadata=option("k3 sampler: dynamic-thresholding percentile in (0, 1] (default: the model's, 0.99)"),
    )
    strength: float = field(default=1.0, metadata=option("how much of the schedule is run: 0 < s ≤ 1"))
    pixel_rounding: str = field(
        default="truncate",
        metadata=option(
            "float → 8 bit: truncate (the official K3 conversion, bit-identical PNGs) or round (as diffusers)",
            choices=PIXEL_ROUNDING,
        ),
    )

    #: request fields that are not inputs of this task (fixed at their default; no CLI option)
    fixed: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        self.validate()

    def validate(self):
        def number(name, value, low=None, high=None, low_open=False):
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if low is not None and (value <= low if low_open else value < low):
                raise ValueError(f"{name} must be {'>' if low_open else '≥'} {low}, got {value}")
            if high is not None and value > high:
                raise ValueError(f"{name} must be ≤ {high}, got {value}")

        for name in ("steps", "num_images", "width", "height"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        number("guidance", self.guidance, 0)
        number("eta", self.eta, 0)
        number("threshold_percentile", self.threshold_percentile, 0, 1, low_open=True)
        number("strength", self.strength, 0, 1, low_open=True)
        seeds = self.seed if isinstance(self.seed, (list, tuple)) else [] if self.seed is None else [self.seed]
        if isinstance(self.seed, (list, tuple)) and not seeds:
            raise ValueError("seed: give at least one seed, or none for a random one")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
                raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED}, got {s!r}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.pixel_rounding not in PIXEL_ROUNDING:
            raise ValueError(f"pixel_rounding must be one of {', '.join(PIXEL_ROUNDING)}, got {self.pixel_rounding!r}")
        for name in self.fixed:
            default = type(self).__dataclass_fields__[name].default
            if getattr(self, name) != default:
                raise ValueError(f"{name} is not a setting of {type(self).__name__} (it is fixed at {default!r})")

    def _sampler_and_guidance(self, variant: Variant) -> tuple[str, float]:
        """The sampler a run uses and its guidance (a given value, else the sampler's default for the variant)."""
        d = variant.sampler
        sampler = self.sampler or d.kind
        if not SAMPLERS[sampler].guided:
            guidance = 0.0
        else:
            guidance = d.guidance if SAMPLERS[d.kind].guided else DEFAULT_GUIDANCE
        return sampler, self.guidance if self.guidance is not None else guidance

    def guidance_for(self, variant: Variant) -> float:
        """The guidance weight a run of this request on ``variant`` uses (0: one U-Net branch, no guidance)."""
        return self._sampler_and_guidance(variant)[1]

    def resolve(self, variant: Variant) -> "GenerationSettings":
        """Fill every ``None`` with the variant's default (the defaults of another sampler where one is chosen)."""
        d = variant.sampler
        sampler, guidance = self._sampler_and_guidance(variant)
        return replace(
            self,
            steps=self.steps
            if self.steps is not None
            else (d.steps if sampler == d.kind else SAMPLERS[sampler].default_steps),
            guidance=guidance,
            width=self.width or variant.size,
            height=self.height or variant.size,
            sampler=sampler,
            eta=self.eta if self.eta is not None else d.eta,
            threshold_percentile=self.threshold_percentile
            if self.threshold_percentile is not None
            else d.threshold_percentile,
        )

    def ignored(self, variant: Variant) -> list[str]:
        """Settings given that this run will not read, one message each (warned, not refused: a shared config or a
        script may carry them for other samplers)."""
        sampler, guidance = self._sampler_and_guidance(variant)
        messages = [
            f"{name} is read by the k3 sampler only: the {sampler} sampler ignores it"
            for name in ("eta", "threshold_percentile")
            if getattr(self, name) is not None and name not in SAMPLERS[sampler].reads
        ]
        negative = getattr(self, "negative_prompt", None) is not None
        if not SAMPLERS[sampler].guided and (self.guidance or negative):
            messages.append(
                f"the {sampler} sampler uses no classifier-free guidance: guidance and negative prompts are ignored"
            )
        elif negative and guidance == 0:
            messages.append("the negative prompt has no effect at guidance 0")
        return messages

    def to_dict(self) -> dict:
        """The shared settings only (what the PNG metadata records), not the task's inputs."""
        return {f.name: getattr(self, f.name) for f in fields(GenerationSettings)}

    @classmethod
    def task_fields(cls) -> list:
        """The fields a caller sets for this task: every field but the ``fixed`` ones."""
        return [f for f in fields(cls) if f.name not in cls.fixed]


IMAGE = option("input image (path, PIL image or array)", positional=True)
IMAGE_WEIGHT = option(
    "IP-Adapter: how strongly the image prompt steers, the weight of its attention in every text cross-attention "
    "(0 = none; default 1, as released)"
)


@dataclass(frozen=True, kw_only=True)
class ImagePromptSettings(GenerationSettings):
    """How an IP-Adapter image prompt steers: its weight, and a boost of that weight over the first, noisiest
    steps (where shapes and layout form; ``diffusion.image_prompt``). ``None``: the adapter's own setting (its
    ``ip_adapter.json`` ``sampling``; none for the released adapter)."""

    image_weight: float = field(default=1.0, metadata=IMAGE_WEIGHT)
    early_boost: float | None = field(
        default=None,
        metadata=option(
            "IP-Adapter: multiply the image weight by this over the first --early-fraction of the steps, the noisy "
            "ones where shapes form (1 = no boost; default: the adapter's own setting, none for the released one)"
        ),
    )
    early_fraction: float | None = field(
        default=None,
        metadata=option("IP-Adapter: the fraction of the steps --early-boost applies to (default: the adapter's own)"),
    )

    def validate(self):
        super().validate()
        check_image_prompt(self.image_weight, self.early_boost, self.early_fraction)


PROMPT = option("the prompt (empty: unconditional)", positional=True, nargs="?")
NEGATIVE = option("negative prompt (replaces the unconditional branch)")


@dataclass(frozen=True, kw_only=True)
class TextToImage(ImagePromptSettings):
    """Text → image."""

    command: ClassVar[str] = "generate"
    fixed: ClassVar[tuple[str, ...]] = ("strength",)

    prompt: str | list[str] = field(default="", metadata=PROMPT)
    negative_prompt: str | list[str] | None = field(default=None, metadata=NEGATIVE)
    beautify: Any = field(
        default=None,
        metadata=option(
            "expand the prompt first: with no value the model's own beautifier (template for nano, a local LLM "
            "otherwise); or template (the model's vocabulary, no model), local (an LLM) or a server URL",
            nargs="?",
            const=True,
            metavar="BACKEND",
        ),
    )
    upscale: int | None = field(default=None, metadata=option("chain the nano upscaler (2× or 4×)", choices=(2, 4)))
    image: Any = field(
        default=None,
        metadata=option(
            "IP-Adapter image prompt: generate this picture's content as the text asks (path, PIL image or array; "
            "the model's adapter is loaded on first use)"
        ),
    )

    def validate(self):
        super().validate()
        if isinstance(self.beautify, str) and self.beautify:
            parse_beautify(self.beautify)


@dataclass(frozen=True, kw_only=True)
class ImageToImage(GenerationSettings):
    """Image → image: noise the image's latent part-way (``strength`` of the schedule) and denoise it."""

    command: ClassVar[str] = "edit"

    image: Any = field(metadata=IMAGE)
    prompt: str | list[str] = field(default="", metadata=PROMPT)
    negative_prompt: str | list[str] | None = field(default=None, metadata=NEGATIVE)
    strength: float = field(default=0.3, metadata=option("how much to change: 0 < s ≤ 1 (default 0.3)"))


@dataclass(frozen=True, kw_only=True)
class Inpaint(GenerationSettings):
    """Repaint where ``mask`` is 1 (white)."""

    command: ClassVar[str] = "inpaint"
    fixed: ClassVar[tuple[str, ...]] = ("strength",)

    image: Any = field(metadata=IMAGE)
    mask: Any = field(metadata=option("mask of the image's size: 1 / white = repaint", positional=True))
    prompt: str | list[str] = field(default="", metadata=PROMPT)
    negative_prompt: str | list[str] | None = field(default=None, metadata=NEGATIVE)
    dilate: bool = field(default=False, metadata=option("grow the mask by ≈6 px like the official prepare_mask"))
    paste_back: bool = field(default=False, metadata=option("keep the original pixels outside the mask"))


@dataclass(frozen=True, kw_only=True)
class Outpaint(GenerationSettings):
    """Extend the canvas by the given margins (pixels) and inpaint the new border."""

    command: ClassVar[str] = "outpaint"
    fixed: ClassVar[tuple[str, ...]] = ("strength", "width", "height")

    image: Any = field(metadata=IMAGE)
    prompt: str | list[str] = field(default="", metadata=PROMPT)
    negative_prompt: str | list[str] | None = field(default=None, metadata=NEGATIVE)
    left: int = field(default=0, metadata=option("pixels to add on the left"))
    right: int = field(default=0, metadata=option("pixels to add on the right"))
    top: int = field(default=0, metadata=option("pixels to add on the top"))
    bottom: int = field(default=0, metadata=option("pixels to add on the bottom"))
    dilate: bool = field(default=False, metadata=option("grow the mask by ≈6 px like the official prepare_mask"))
    paste_back: bool = field(default=False, metadata=option("keep the original pixels outside the mask"))

    def validate(self):
        super().validate()
        margins = (self.left, self.right, self.top, self.bottom)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in margins) or not any(margins):
            raise ValueError(
                "outpainting needs non-negative whole-pixel margins (left, right, top, bottom), at "
                "least one of them positive"
            )


CONTROL_SCALE_RANGE = (0.0, 2.0)  # the usual ControlNet weight slider (diffusers / ComfyUI UIs)


@dataclass(frozen=True, kw_only=True)
class Control(GenerationSettings):
    """ControlNet (HED): a new picture with the layout of ``image`` — its soft edges are extracted (or it is an edge
    map already: ``hint_is_edges``) and steer every step inside the control window. With ``init_image`` it is
    image→image too (``strength`` of the schedule is run from that picture's latent)."""

    command: ClassVar[str] = "control"

    image: Any = field(
        metadata=option(
            "control image (path, PIL image or array; the API also takes one per prompt): a picture whose edges "
            "give the layout, or an edge map with --hint-is-edges; resized to the output size",
            positional=True,
        )
    )
    prompt: str | list[str] = field(default="", metadata=PROMPT)
    negative_prompt: str | list[str] | None = field(default=None, metadata=NEGATIVE)
    hint_is_edges: bool = field(
        default=False, metadata=option("the image is an edge map already (white edges on black): no extraction")
    )
    edges: str | None = field(
        default=None,
        metadata=option(
            "how edges are extracted: soft (offline) or hed (the HED network, downloads ControlNetHED.pth) "
            "(default: what the ControlNet was trained on: soft for nano's, hed for the released one)",
            choices=("soft", "hed"),
        ),
    )
    hed_weights: str | None = field(
        default=None,
        metadata=option(
            "with --edges hed: a local ControlNetHED.pth / .safetensors file or a hub id (default: "
            "lllyasviel/Annotators/ControlNetHED.pth, downloaded)"
        ),
    )
    scale: float | Any = field(
        default=1.0,
        metadata=option(
            f"ControlNet conditioning scale k, {CONTROL_SCALE_RANGE[0]:g} to {CONTROL_SCALE_RANGE[1]:g} (the API "
            "also takes a spatial map (H, W) in that range)"
        ),
    )
    start: float = field(default=0.0, metadata=option("control from this fraction of the steps (0 ≤ start < end)"))
    end: float = field(default=1.0, metadata=option("control until this fraction of the steps (start < end ≤ 1)"))
    init_image: Any = field(
        default=None, metadata=option("image→image: start from this picture, running --strength of the schedule")
    )

    def validate(self):
        super().validate()
        for name in ("start", "end"):
            check_fraction(name, getattr(self, name))
        if not self.start < self.end:
            raise ValueError(
                f"the control window is empty: start ({self.start}) must be less than end ({self.end}); "
                "use scale=0 for no control"
            )
        low, high = CONTROL_SCALE_RANGE
        if isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool):
            if not (math.isfinite(self.scale) and low <= self.scale <= high):
                raise ValueError(f"scale must be from {low:g} to {high:g}, got {self.scale}")
        else:
            import numpy as np

            try:
                values = np.asarray(self.scale, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"scale must be a number or a spatial map (H, W), got {type(self.scale).__name__}")
            if values.ndim not in (2, 4) or not np.isfinite(values).all() or values.min() < low or values.max() > high:
                raise ValueError(
                    f"a spatial scale map must be (H, W) or (1, 1, H, W) with values from {low:g} to {high:g}"
                )
        if self.edges not in (None, "soft", "hed"):
            raise ValueError(f"edges must be soft or hed, got {self.edges!r}")
        if self.hed_weights is not None and (self.edges == "soft" or self.hint_is_edges):
            raise ValueError(
                "hed_weights is only used when edges are extracted with the HED network: drop it, or use edges='hed' "
                "without hint_is_edges"
            )
        if self.hint_is_edges and self.edges is not None:
            raise ValueError(f"hint_is_edges takes the image as an edge map, so edges={self.edges!r} would not be used")
        if self.strength < 1 and self.init_image is None:
            raise ValueError("strength < 1 needs init_image (the picture an image→image run starts from)")
        if self.init_image is not None and self.strength == 1:
            raise ValueError(
                "init_image has no effect at strength 1 (the whole schedule runs from noise): pass a strength below "
                "1, e.g. 0.7, or drop init_image"
            )


MIX_RULES = ("sum", "mean")


@dataclass(frozen=True, kw_only=True)
class Variation(ImagePromptSettings):
    """Variations of a picture (IP-Adapter): its content, no text (the empty prompt's text branch as the adapter
    was trained: all-zero context and mask for the released adapter, the null context for nano's)."""

    command: ClassVar[str] = "variation"
    fixed: ClassVar[tuple[str, ...]] = ("strength",)

    image: Any = field(metadata=option("reference image (path, PIL image or array)", positional=True))


@dataclass(frozen=True, kw_only=True)
class Mix(ImagePromptSettings):
    """Mix pictures (IP-Adapter): the image prompt is Σ wᵢ·CLIP(imageᵢ) (the released rule), optionally with text."""

    command: ClassVar[str] = "mix"
    fixed: ClassVar[tuple[str, ...]] = ("strength",)

    images: Any = field(metadata=option("reference images (paths, PIL images or arrays)", positional=True, nargs="+"))
    weights: list[float] | None = field(
        default=None, metadata=option("one weight ≥ 0 per image (default: equal weights summing to 1)", nargs="+")
    )
    prompt: str = field(default="", metadata=option("text to steer the mix (default: none, image only)"))
    mix_rule: str = field(
        default="sum",
        metadata=option(
            "sum: Σ wᵢ·eᵢ of the raw embeddings (released); mean: a weighted mean of unit directions at the weighted "
            "mean norm",
            choices=MIX_RULES,
        ),
    )

    def validate(self):
        super().validate()
        images = self.images
        if isinstance(images, (str, bytes)) or not hasattr(images, "__len__") or len(images) < 1:
            raise ValueError("images: give a list of one or more images to mix")
        if self.weights is not None:
            weights = list(self.weights)
            if len(weights) != len(images):
                raise ValueError(f"{len(weights)} weights for {len(images)} images: give one weight per image")
            for w in weights:
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                    raise ValueError(f"weights must be finite numbers ≥ 0, got {w!r}")
            if not any(weights):
                raise ValueError("weights are all 0: give at least one positive weight (or use generate for no image)")
        if self.mix_rule not in MIX_RULES:
            raise ValueError(f"mix_rule must be one of {', '.join(MIX_RULES)}, got {self.mix_rule!r}")
        if not isinstance(self.prompt, str):
            raise ValueError("prompt: one string (a mix makes one picture per seed)")

    def resolved_weights(self) -> list[float]:
        if self.weights is not None:
            return [float(w) for w in self.weights]
        return [1.0 / len(self.images)] * len(self.images)


REQUESTS: tuple[type[GenerationSettings], ...] = (
    TextToImage,
    ImageToImage,
    Inpaint,
    Outpaint,
    Control,
    Variation,
    Mix,
)
