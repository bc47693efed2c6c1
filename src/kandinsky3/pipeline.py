"""``Kandinsky3``: load once, then generate / edit / inpaint / outpaint — one sampling loop for every task."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import threading
import warnings

import torch
from PIL import Image

from .checkpoints import Components, load_components, save_components
from .devices import default_device
from .diffusion import Conditioning, Denoiser, NoiseSchedule
from .diffusion.graphs import GraphedStep
from .diffusion.sampling import SAMPLERS, NoiseSource, SamplerRun, StepCallback
from .images import tensor_to_pil, with_metadata
from .offload import is_quantized, lent, streamed
from .requests import Control, GenerationSettings, ImageToImage, Inpaint, Mix, Outpaint, TextToImage, Variation
from .tasks import TASKS, Plan


def _request(cls, settings: dict, **inputs):
    """Build a request from a convenience method's keywords, naming unknown ones."""
    names = {f.name for f in cls.task_fields()}
    unknown = set(settings) - names
    if unknown:
        raise TypeError(
            f"unknown setting(s) {sorted(unknown)} for {cls.__name__}; valid: {sorted(names - set(inputs))}"
        )
    return cls(**inputs, **{k: v for k, v in settings.items() if v is not None})


DECODE_CHUNK = 2  # pictures decoded by the MoVQ at once
ALLOCATOR_SLACK = {"cpu": 2.0, "cuda": 1.25}  # process memory over the live tensors' peak (docs/errors.md)
FUSED_ATTENTION_DEVICES = ("cpu", "cuda")  # PyTorch's SDPA kernels there store no score matrices


def estimate_memory(
    variant,
    width: int,
    height: int,
    images: int,
    tiled: bool = False,
    attention_scores: bool = False,
    element_bytes: int = 4,
    device_type: str = "cpu",
    branches: int = 2,
) -> int:
    """The peak activation memory (bytes, weights excluded) of generating ``images`` pictures of ``width``×``height``,
    to refuse a run that cannot fit before anything is allocated. The larger of the U-Net's peak over the whole
    batch (``branches``: 2 with classifier-free guidance, 1 at guidance 0) and the MoVQ decode of ``DECODE_CHUNK``
    pictures (one tile each with ``tiled``), plus the finished pictures; times the allocator's slack for
    ``device_type``. The element counts follow the two architectures' largest sets of live tensors and match a
    live-tensor trace on the meta device to 1 % (``tests/test_memory_estimate.py``). ``attention_scores`` counts
    score matrices, for an attention kernel that stores them (PyTorch's CPU and CUDA SDPA kernels do not)."""
    f = variant.movq.downsample_factor
    unet = branches * images * _unet_activations(variant.unet, height // f, width // f, attention_scores)
    tile = variant.movq.tile_sample_min_size
    decode_height, decode_width = (min(height, tile), min(width, tile)) if tiled else (height, width)
    chunk = min(images, DECODE_CHUNK)
    decode = chunk * _decoder_activations(variant.movq, decode_height, decode_width, attention_scores)
    pictures = 3 * height * width * (images + 2 * chunk * 4)  # uint8 pictures; the fp32 decode and its accumulator
    slack = ALLOCATOR_SLACK.get(device_type, ALLOCATOR_SLACK["cpu"])
    return int(slack * (element_bytes * max(unet, decode) + pictures))


def _unet_activations(u, h: int, w: int, attention_scores: bool, context_tokens: int = 128) -> int:
    """Peak live elements of one U-Net sample at latent h×w. The largest maps are the feed-forward of the first
    attention block of an up level: level i's width plus the concatenated skip (2·W_i) at the level's resolution,
    expanded ``expansion_ratio`` times, held twice (convolution, SiLU) beside ≈ 5 maps of its input width. The
    skips wait meanwhile. Without attention, the up level's first ResNet block: ≈ 4 maps of the concatenated
    width. ``attention_scores`` adds score and softmax matrices (an unfused attention kernel)."""
    levels = len(u.dim_mult)
    widths = [u.model_channels * m for m in u.dim_mult]
    tokens = [max(1, h >> i) * max(1, w >> i) for i in range(levels)]
    skips = sum(widths[i] * tokens[i + 1] for i in range(levels - 1))
    peak = 0
    for i in range(levels):
        concatenated = 2 * widths[i] if i < levels - 1 else widths[i]
        peak = max(peak, 4 * concatenated * tokens[i])
        if u.add_cross_attention[i] or u.add_self_attention[i]:
            peak = max(peak, (2 * u.expansion_ratio + 5) * concatenated * tokens[i])
        if attention_scores:
            heads = concatenated // u.head_dim
            if u.add_cross_attention[i]:
                peak = max(peak, 2 * heads * tokens[i] * context_tokens + 5 * concatenated * tokens[i])
            below = widths[i - 1] if i else u.resolved_init_channels  # self-attention runs at the level's input width
            if u.add_self_attention[i]:
                peak = max(peak, 2 * (below // u.head_dim) * tokens[i] ** 2 + 5 * below * tokens[i])
    return peak + skips


def _decoder_activations(m, height: int, width: int, attention_scores: bool) -> int:
    """Peak live elements of one MoVQ decode of height×width pixels. Each level's first block holds ≈ 3 maps of the
    width that enters it (input, GroupNorm, latent modulation) at the level's resolution; attention levels hold
    ≈ 6 maps plus, unfused, the single head's score and softmax matrices."""
    levels = len(m.ch_mult)
    peak = 0
    for i in range(levels):
        pixels = (height >> i) * (width >> i)
        entering = m.ch * m.ch_mult[min(i + 1, levels - 1)]
        peak = max(peak, 3 * entering * pixels)
        if m.resolution >> i in m.attn_resolutions or i == levels - 1:  # the deepest: the middle block's attention
            peak = max(peak, 6 * entering * pixels + (2 * pixels**2 if attention_scores else 0))
    return peak


def device_memory(device) -> int:
    """Total memory of ``device`` in bytes (the GPU's, or the machine's RAM for the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 16 * 2**30


def _preset_16gb(device: torch.device) -> dict:
    """A 16 GB GPU at 1024²: bf16 U-Net (6.1 GiB) and MoVQ resident, the bf16 FLAN-UL2 encoder (17.7 GB) kept in CPU
    memory and streamed to the GPU one block (0.5 GiB) at a time while it encodes, tiled MoVQ decode. Exact bf16
    numerics and no bitsandbytes; the price is the encoder's copy over PCIe once per prompt (docs/performance.md).
    An 8-bit encoder does not fit beside the U-Net: transformers keeps T5's ``wo`` layers out of int8 (fp16
    overflow), so 8-bit FLAN-UL2 is ≈ 10 GiB, and bitsandbytes weights cannot be offloaded."""
    return dict(dtype="bf16", stream_text_encoder=True, offload=False, movq_tiling=True)


MEMORY_PRESETS = {"16gb": _preset_16gb}


def check_quantization(quantization: str | None, device: torch.device):
    """Refused before loading: bitsandbytes' 8/4-bit layers run on CUDA and need the package installed."""
    if quantization is None:
        return
    if quantization not in ("8bit", "4bit"):
        raise ValueError(f"text_encoder_quantization must be '8bit' or '4bit', not {quantization!r}")
    if device.type != "cuda":
        raise ValueError(
            f"text_encoder_quantization={quantization!r} uses bitsandbytes' CUDA kernels: it needs a CUDA "
            f"device, not {device}; on a CPU drop it (to save memory there: stream_text_encoder, CLI "
            "--stream-text-encoder, or a smaller dtype)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        message = 'bitsandbytes is not installed: pip install -e ".[quantization]"'
        raise ModuleNotFoundError(message, name="bitsandbytes")


class Kandinsky3:
    """The Kandinsky 3 family behind one object.

    >>> pipe = Kandinsky3.from_pretrained()            # the embedded nano model
    >>> [image] = pipe.generate("a red circle in the top left on a gray background", seed=0)
    """

    def __init__(
        self,
        components: Components,
        device: str | torch.device = "cpu",
        offload: bool = False,
        movq_tiling: bool = False,
        stream_text_encoder: bool = False,
        cuda_graph: bool = False,
    ):
        self.variant = components.variant
        self.unet = components.unet
        self.movq = components.movq
        self.text_encoder = components.text_encoder
        self.device = torch.device(device)
        self.offload = offload
        self.movq_tiling = movq_tiling
        self.stream_text_encoder = stream_text_encoder
        if cuda_graph:
            self._check_cuda_graph(self.device, offload)
        self.graphed_unet = GraphedStep(self.unet) if cuda_graph else None
        self._lock = threading.RLock()
        self.schedule = NoiseSchedule.named("cosine")
        self.controlnet = None  # loaded by from_pretrained(controlnet=…) or on the first control() (get_controlnet)
        self.ip_adapter = None  # IP-Adapter + image encoder: loaded on the first image prompt (get_ip_adapter)

    @staticmethod
    def _check_cuda_graph(device: torch.device, offload: bool):
        if offload:
            raise ValueError(
                "cuda_graph=True cannot be combined with offload=True: a graph reads the weights at the "
                "addresses it was captured with, and offload lends them anew for every run"
            )
        if device.type != "cuda":
            raise ValueError(f"cuda_graph=True replays CUDA graphs: it needs a CUDA device, not {device}")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | None = None,
        *,
        device: str | None = None,
        dtype=None,
        unet_dtype=None,
        movq_dtype=None,
        text_encoder_dtype=None,
        text_encoder_device=None,
        text_encoder_quantization: str | None = None,
        offload: bool = False,
        stream_text_encoder: bool = False,
        cuda_graph: bool = False,
        compile: bool = False,
        channels_last: bool = False,
        local_files_only: bool = False,
        variant: str | None = None,
        movq_tiling: bool = False,
        memory: str | None = None,
        controlnet: str | None = None,
    ) -> "Kandinsky3":
        """Load a registered model (``nano`` by default, ``base``, ``flash``, ``inpainting``, ``tiny``), a Hugging
        Face repo id (official or diffusers layout) or a local folder.

        ``dtype`` sets all components at once; ``unet_dtype`` / ``movq_dtype`` / ``text_encoder_dtype`` override
        it per component. ``offload=True`` keeps weights on the CPU and lends each component to ``device`` only
        while it runs; ``stream_text_encoder=True`` keeps the text encoder's weights on the CPU and lends its blocks
        to ``device`` one at a time as it encodes (:mod:`kandinsky3.offload`). ``cuda_graph=True`` replays the U-Net
        step from CUDA graphs, one captured per input shape (:mod:`kandinsky3.diffusion.graphs`; CUDA only).
        ``text_encoder_quantization`` = "8bit" | "4bit" needs bitsandbytes (a CUDA device).
        ``channels_last=True`` stores U-Net and MoVQ convolution weights NHWC (faster convolutions on GPUs with
        tensor cores; same outputs). ``movq_tiling=True`` encodes / decodes images with a side over the MoVQ tile
        (1024 px) in overlapping tiles, as KandiSuperRes does: less memory, slightly different pixels; off by
        default, as in the official pipelines (docs/sampling.md).

        ``memory="16gb"`` is the preset for 16 GB GPUs (:data:`MEMORY_PRESETS`): bf16 U-Net and MoVQ resident, the
        bf16 text encoder streamed block by block, tiled MoVQ. Options given explicitly win over the preset's.

        ``controlnet``: a ControlNet to load now (a name — ``nano-controlnet``, ``hed`` — a folder or a hub id);
        without it ``control()`` loads the variant's own (``Variant.controlnet``) on first use.
        """
        device = default_device(device)
        if memory is not None:
            if memory not in MEMORY_PRESETS:
                raise ValueError(f"unknown memory preset {memory!r}: use one of {', '.join(MEMORY_PRESETS)}")
            preset = MEMORY_PRESETS[memory](device)
            dtype = dtype if dtype is not None else preset["dtype"]
            offload, movq_tiling = offload or preset["offload"], movq_tiling or preset["movq_tiling"]
            stream_text_encoder = stream_text_encoder or (
                preset["stream_text_encoder"] and not text_encoder_quantization
            )
            if text_encoder_quantization:  # an 8-bit encoder stays resident (≈ 10 GiB): U-Net and MoVQ must move
                offload = True
        if stream_text_encoder and text_encoder_quantization:
            raise ValueError(
                "a quantized text encoder cannot be streamed (bitsandbytes weights do not move): "
                "drop stream_text_encoder or text_encoder_quantization"
            )
        if cuda_graph:  # refused before minutes of loading, not after
            cls._check_cuda_graph(device, offload)
        check_quantization(text_encoder_quantization, torch.device(text_encoder_device or device))
        if stream_text_encoder and text_encoder_device is None:
            text_encoder_device = "cpu"  # the masters; its blocks are lent to `device` as it runs
        load_device = "cpu" if offload else device
        components = load_components(
            name_or_path,
            device=load_device,
            unet_dtype=unet_dtype or dtype,
            movq_dtype=movq_dtype or dtype,
            text_encoder_dtype=text_encoder_dtype or dtype,
            text_encoder_device=text_encoder_device,
            quantization=text_encoder_quantization,
            local_files_only=local_files_only,
            variant=variant,
        )
        pipe = cls(
            components,
            device=device,
            offload=offload,
            movq_tiling=movq_tiling,
            stream_text_encoder=stream_text_encoder,
            cuda_graph=cuda_graph,
        )
        if channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.movq.to(memory_format=torch.channels_last)
        if compile:
            pipe.unet.compile()
        if controlnet is not None:
            pipe.get_controlnet(controlnet, local_files_only=local_files_only)
        return pipe

    def save_pretrained(self, path, layout: str = "native"):
        """Write the model as ``native`` safetensors, ``official`` .pt files or a ``diffusers`` folder."""
        save_components(Components(self.variant, self.unet, self.movq, self.text_encoder), path, layout)

    # -- geometry ----------------------------------------------------------------------------------------------

    @property
    def latent_factor(self) -> int:
        return self.movq.config.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (64 for the released models)."""
        return self.latent_factor * self.unet.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.movq.config.embed_dim

    @property
    def is_inpainting(self) -> bool:
        """The variant's fact (``Variant.is_inpainting``), not this U-Net's channel count."""
        return self.variant.is_inpainting

    # -- public tasks ------------------------------------------------------------------------------------------

    def run(
        self,
        request: GenerationSettings,
        *,
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
        progress: bool = True,
    ) -> list[Image.Image]:
        """The one path every task takes: plan the request (:data:`~kandinsky3.tasks.TASKS`), encode the prompts,
        sample with the adapters, decode, finish.

        ``callback(step, t, latents)`` is called after every sampler step; returning ``False`` stops the run
        (:class:`~kandinsky3.diffusion.sampling.GenerationCancelled`). Calls are serialised by a lock: one pipeline
        may be shared by threads, one run at a time (placement and offload are per pipeline)."""
        builder = TASKS.get(type(request))
        if builder is None:
            raise TypeError(f"no task for {type(request).__name__}; known: {', '.join(t.__name__ for t in TASKS)}")
        for message in request.ignored(self.variant):
            warnings.warn(message, stacklevel=2)
        with self._lock:
            plan = builder(self, request)
            if plan.images is not None:  # nothing to sample (an empty inpainting mask): the builder's result
                return plan.images
            images = self._execute(plan, generator, callback, progress)
            images = plan.finish(images) if plan.finish else images
            return self.upscale_images(images, plan.upscale, progress) if plan.upscale else images

    def generate(
        self,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] | None = None,
        *,
        generator: torch.Generator | None = None,
        progress: bool = True,
        callback=None,
        **settings,
    ) -> list[Image.Image]:
        """Text → image (:class:`~kandinsky3.requests.TextToImage`): steps, guidance, width, height, num_images,
        seed (one, or one per image), sampler, eta, threshold_percentile, pixel_rounding. An empty prompt is valid
        (unconditional generation; encoded as EOS alone, as in the official code).

        ``beautify``: True / "local" (an LLM), "template" (shapes world, no model), "server URL", or a
        :class:`~kandinsky3.prompts.Beautifier`; the prompt actually used is in each image's metadata
        (``prompt``, with ``original_prompt``).

        ``upscale``: 2 or 4 chains the default upscaler (:class:`~kandinsky3.superres.SuperRes`, nano) after
        generation; pass a ``SuperRes`` to use another one at its own scale."""
        request = _request(TextToImage, settings, prompt=prompt, negative_prompt=negative_prompt)
        return self.run(request, generator=generator, callback=callback, progress=progress)

    def edit(
        self,
        image,
        prompt: str | list[str] = "",
        strength: float = 0.3,
        negative_prompt: str | list[str] | None = None,
        *,
        generator=None,
        progress: bool = True,
        callback=None,
        **settings,
    ) -> list[Image.Image]:
        """Image → image (:class:`~kandinsky3.requests.ImageToImage`): noise the image's latent part-way
        (``strength`` of the schedule) and denoise it."""
        request = _request(
            ImageToImage, settings, image=image, prompt=prompt, strength=strength, negative_prompt=negative_prompt
        )
        return self.run(request, generator=generator, callback=callback, progress=progress)

    def inpaint(
        self,
        image,
        mask,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] | None = None,
        *,
        generator=None,
        progress: bool = True,
        callback=None,
        **settings,
    ) -> list[Image.Image]:
        """Repaint where ``mask`` is 1 (white) (:class:`~kandinsky3.requests.Inpaint`). ``dilate`` grows the mask
        like the official ``prepare_mask``; ``paste_back`` puts the original pixels back outside the mask (off by
        default, as in the official code)."""
        request = _request(Inpaint, settings, image=image, mask=mask, prompt=prompt, negative_prompt=negative_prompt)
        return self.run(request, generator=generator, callback=callback, progress=progress)

    def outpaint(
        self, image, prompt: str | list[str] = "", *, generator=None, progress: bool = True, callback=None, **settings
    ) -> list[Image.Image]:
        """Extend the canvas by the given margins (``left``, ``right``, ``top``, ``bottom`` pixels) and inpaint the
        new border (:class:`~kandinsky3.requests.Outpaint`)."""
        request = _request(Outpaint, settings, image=image, prompt=prompt)
        return self.run(request, generator=generator, callback=callback, progress=progress)

    def control(
        self,
        image,
        prompt: str | list[str] = "",
        scale=1.0,
        start: float = 0.0,
        end: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        *,
        generator=None,
        progress: bool = True,
        callback=None,
        **settings,
    ) -> list[Image.Image]:
        """ControlNet (:class:`~kandinsky3.requests.Control`): a picture with the layout (soft edges) of ``image``
        (``hint_is_edges=True``: ``image`` is an edge map), steered with weight ``scale`` (a number or an (H, W)
        map) from ``start`` to ``end`` (fractions of the steps). ``init_image`` + ``strength``: image→image.
        The ControlNet is the variant's own (``Variant.controlnet``), loaded on first use."""
        request = _request(
            Control,
            settings,
            image=image,
            prompt=prompt,
            scale=scale,
            start=start,
            end=end,
            negative_prompt=negative_prompt,
        )
        return self.run(request, generator=generator, callback=callback, progress=progress)

    def get_controlnet(self, name_or_path=None, local_files_only: bool = False):
        """The pipeline's ControlNet, loading ``name_or_path`` (default: ``Variant.controlnet``) if none is loaded
        or another is named; it must belong to this U-Net's size (clear error otherwise)."""
        from .checkpoints.controlnet import load_controlnet

        name = name_or_path or self.variant.controlnet
        if self.controlnet is not None and (name_or_path is None or name == self.__dict__.get("_controlnet_name")):
            return self.controlnet
        if name is None:
            raise ValueError(
                f"the {self.variant.name} model has no ControlNet; load one: "
                "Kandinsky3.from_pretrained(…, controlnet=FOLDER)"
            )
        param = next(self.unet.parameters())
        self.controlnet = load_controlnet(
            name,
            self.unet.config,
            device="cpu" if self.offload else self.device,
            dtype=param.dtype,
            local_files_only=local_files_only,
        )
        self._controlnet_name = name
        return self.controlnet

    def variation(
        self, image, *, generator=None, progress: bool = True, callback=None, **settings
    ) -> list[Image.Image]:
        """Variations of ``image`` (IP-Adapter, :class:`~kandinsky3.requests.Variation`): its content, no text.
        ``image_weight`` scales the image prompt; the adapter (``Variant.ip_adapter``) loads on first use."""
        request = _request(Variation, settings, image=image)
        return self.run(request, generator=generator, callback=callback, progress=progress)

    def mix(
        self,
        images,
        weights=None,
        prompt: str = "",
        *,
        generator=None,
        progress: bool = True,
        callback=None,
        **settings,
    ) -> list[Image.Image]:
        """Mix pictures (IP-Adapter, :class:`~kandinsky3.requests.Mix`): the image prompt Σ wᵢ·CLIP(imageᵢ)
        (``mix_rule="mean"``: a weighted mean of directions), with optional text."""
        request = _request(Mix, settings, images=list(images), weights=weights, prompt=prompt)
        return self.run(request, generator=generator, callback=callback, progress=progress)

    def get_ip_adapter(self, name_or_path=None, image_encoder=None, local_files_only: bool = False):
        """The pipeline's IP-Adapter and image encoder (``checkpoints.ip_adapter.IPAdapterParts``), loading
        ``name_or_path`` (default: ``Variant.ip_adapter``; a name, folder — native or released layout — or hub id)
        if none is loaded or another is named, and attaching it to the U-Net. It must belong to this U-Net's size
        (clear error otherwise)."""
        from .checkpoints.ip_adapter import load_ip_adapter

        if self.ip_adapter is not None and name_or_path is None and image_encoder is None:
            return self.ip_adapter
        param = next(self.unet.parameters())
        parts = load_ip_adapter(
            name_or_path,
            self.unet.config,
            variant=self.variant,
            image_encoder=image_encoder,
            device="cpu" if self.offload else self.device,
            dtype=param.dtype,
            local_files_only=local_files_only,
        )
        parts.adapter.attach(self.unet)
        if self.graphed_unet is not None:
            self.graphed_unet.reset()  # the U-Net's forward changed
        self.ip_adapter = parts
        return parts

    def upscale_images(self, images: list[Image.Image], upscale, progress: bool = True) -> list[Image.Image]:
        """Upscale generated images with a :class:`~kandinsky3.superres.SuperRes` (or 2 / 4: the nano upscaler),
        each with its own seed from its metadata."""
        from .images import read_metadata
        from .superres import SuperRes

        if isinstance(upscale, SuperRes):
            upscaler, scale = upscale, upscale.scale
        else:
            if "_upscaler" not in self.__dict__:
                self._upscaler = SuperRes.from_pretrained(device=self.device)
            upscaler, scale = self._upscaler, int(upscale)
        out = []
        for image in images:
            meta = read_metadata(image)
            big = upscaler.upscale(image, scale, seed=meta.get("seed"), progress=progress)
            out.append(with_metadata(big, {**meta, "upscale": scale, "upscaler": upscaler.name}))
        return out

    def beautify(self, prompt: str, beautifier=True):
        """Expand ``prompt`` with a beautifier (see :mod:`kandinsky3.prompts`), within the text encoder's budget.

        ``True`` is the variant's own beautifier (``Variant.beautifier``: the template for nano, a local LLM
        otherwise); the template uses the model's ``vocabulary.json`` when its folder has one. Beautifiers are cached
        on the pipeline, so the same prompt is expanded once per session."""
        from .prompts import TemplateBeautifier, make_beautifier
        from .vocabulary import SceneVocabulary

        if beautifier is True:
            beautifier = self.variant.beautifier
        key = beautifier if isinstance(beautifier, str) else id(beautifier)
        cache = self.__dict__.setdefault("_beautifiers", {})
        if key not in cache:
            words = self.variant.local_dir / "vocabulary.json" if self.variant.local_dir else None
            if beautifier == "template" and words is not None and words.is_file():
                cache[key] = TemplateBeautifier(SceneVocabulary.load(words))
            else:
                cache[key] = make_beautifier(beautifier)
        return cache[key](prompt, self.text_encoder.tokenizer, self.text_encoder.max_length)

    # -- the one denoising path ------------------------------------------------------------------------------------

    def _conditioning(self, plan: Plan, guided: bool) -> Conditioning:
        with self.placed(self.text_encoder):
            context, mask, neg_context, neg_mask = self.text_encoder.encode(
                plan.prompts, plan.negative_prompts if guided else None
            )
            if guided and neg_context is None:
                neg_context, neg_mask = self.text_encoder.unconditional(context)
        n = plan.settings.num_images
        rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        lengths = self.text_encoder.crop_lengths(mask, self.text_encoder.max_length)
        return Conditioning(
            rep(context),
            rep(mask),
            rep(neg_context) if guided else None,
            rep(neg_mask) if guided else None,
            context_lengths=rep(lengths),
        )

    def _execute(self, plan: Plan, generator, callback, progress) -> list[Image.Image]:
        s = plan.settings
        sampler = SAMPLERS[s.sampler]
        if not plan.adapters and self.is_inpainting:
            raise ValueError("this is an inpainting U-Net: use inpaint() or outpaint()")
        self._warn_about_inputs(plan)
        seeds = list(s.seed) if isinstance(s.seed, (list, tuple)) else None
        if seeds is not None and len(seeds) != plan.batch_size:
            raise ValueError(f"{len(seeds)} seeds for {plan.batch_size} images: give one seed, or one per image")
        seed = seeds or s.seed
        if seed is None and generator is None:
            seed = random.randrange(2**32)
        noise = NoiseSource(generator) if generator is not None else NoiseSource.from_seed(seed)
        cond = self._conditioning(plan, guided=sampler.guided and s.guidance > 0)
        x = noise.randn(plan.shape)
        with self.placed(self.unet):
            x = x.to(self.device)
            unet = self.graphed_unet if self.graphed_unet is not None else self.unet
            denoiser = Denoiser(unet, cond, s.guidance if sampler.guided else 0.0, plan.adapters)
            x0 = None if plan.init_latents is None else plan.init_latents.to(x.device, torch.float32)
            run = SamplerRun(
                self.schedule, s.steps, noise, s.eta, s.threshold_percentile, x0, s.strength, callback, progress
            )
            latents = sampler.sample(denoiser, x, run)
        if not bool(torch.isfinite(latents).all()):  # one read per run: a black picture is no answer
            dtype = next(self.unet.parameters()).dtype
            fix = "lower the guidance (--guidance), or " if s.guidance else ""
            raise ValueError(
                f"the run produced NaN or inf values (guidance {s.guidance:g}, U-Net {dtype}); {fix}use a wider "
                "dtype (bf16 / fp32) if the weights are fp16, or check the weights"
            )
        with self.placed(self.movq):
            images = self._decode(latents, s.pixel_rounding)
        settings = {k: v for k, v in s.to_dict().items() if k != "seed"}
        out = []
        for i, image in enumerate(images):
            p = i // s.num_images
            meta = {
                "task": plan.task,
                "model": self.variant.name,
                "prompt": plan.prompts[p],
                "negative_prompt": None if plan.negative_prompts is None else plan.negative_prompts[p],
                "seed": seeds[i] if seeds is not None else seed,
                "index": i,
                **settings,
                **plan.metadata,
            }
            if plan.original_prompts is not None:
                meta["original_prompt"] = plan.original_prompts[p]
            out.append(with_metadata(image, meta))
        return out

    def _warn_about_inputs(self, plan: Plan):
        """One warning for prompt words the tokenizer does not know, one for a prompt longer than the encoder reads,
        one for a size the model was not trained at (more than 2× off its ``variant.size``² pixels either way)."""
        texts = list(plan.prompts) + list(plan.negative_prompts or [])
        unknown, overflow = self.text_encoder.read_report(texts)
        if overflow > 0:
            warnings.warn(
                f"a prompt is {overflow} token(s) longer than the {self.text_encoder.max_length} the text encoder "
                "reads (EOS included): its end is cut off",
                stacklevel=5,
            )
        if unknown:
            warnings.warn(
                f"the {self.variant.name} tokenizer does not know {', '.join(map(repr, unknown))}: "
                "read as the unknown token <unk>",
                stacklevel=5,
            )
        s, size = plan.settings, self.variant.size
        if not 0.5 <= s.width * s.height / size**2 <= 2:
            warnings.warn(
                f"{s.width}x{s.height} is far from the {size}x{size} px the {self.variant.name} model was trained at; "
                "expect worse pictures",
                stacklevel=5,
            )

    # -- MoVQ --------------------------------------------------------------------------------------------------

    def _movq_param(self):
        return next(self.movq.parameters())

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """An RGB image (its exact size) → its MoVQ latent (1, C, h, w), fp32."""
        from .images import pil_to_tensor

        with self.placed(self.movq):
            p = self._movq_param()
            return self.movq.encode(pil_to_tensor(image).to(p.device, p.dtype), tiled=self.movq_tiling).float()

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor, rounding: str, chunk: int = DECODE_CHUNK) -> list[Image.Image]:
        p = self._movq_param()
        images = []
        for part in latents.split(chunk):
            decoded = self.movq.decode(part.to(p.device, p.dtype), tiled=self.movq_tiling).float()
            images.extend(tensor_to_pil(decoded, rounding))
        return images

    # -- placement / offload -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def placed(self, module: torch.nn.Module):
        """``module`` on the compute device while it runs: lent whole with ``offload``, block by block for the text
        encoder with ``stream_text_encoder``; otherwise (and for quantized modules, which cannot move) as it is."""
        if is_quantized(module):
            yield module
        elif self.stream_text_encoder and module is self.text_encoder:
            with streamed(module, self.device):
                yield module
        elif self.offload:
            with lent(module, self.device):
                yield module
        else:
            yield module

    def to(self, device) -> "Kandinsky3":
        device = torch.device(device)
        if self.graphed_unet is not None:
            if device.type != "cuda":
                raise ValueError(f"this pipeline replays CUDA graphs (cuda_graph=True): it cannot move to {device}")
            self.graphed_unet.reset()  # captured against the old weights' addresses
        self.device = device
        for m in (self.unet, self.movq, self.text_encoder):
            m.to(self.device)
        if self.ip_adapter is not None:
            self.ip_adapter.adapter.to(self.device)
            self.ip_adapter.encoder.to(self.device)
        return self
