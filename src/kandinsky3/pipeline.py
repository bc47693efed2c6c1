"""``Kandinsky3``: load once, then generate / edit / inpaint / outpaint — one sampling loop for every task."""

from __future__ import annotations

import contextlib
import random
import threading
import warnings

import torch
from PIL import Image

from .checkpoints import Components, load_components, save_components
from .diffusion import Conditioning, Denoiser, NoiseSchedule
from .diffusion.sampling import SAMPLERS, NoiseSource, SamplerRun, StepCallback
from .images import tensor_to_pil, with_metadata
from .requests import GenerationSettings, ImageToImage, Inpaint, Outpaint, TextToImage
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
    ):
        self.variant = components.variant
        self.unet = components.unet
        self.movq = components.movq
        self.text_encoder = components.text_encoder
        self.device = torch.device(device)
        self.offload = offload
        self.movq_tiling = movq_tiling
        self._lock = threading.RLock()
        self.schedule = NoiseSchedule.named("cosine")

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
        compile: bool = False,
        channels_last: bool = False,
        local_files_only: bool = False,
        variant: str | None = None,
        movq_tiling: bool = False,
    ) -> "Kandinsky3":
        """Load a registered model (``nano`` by default, ``base``, ``flash``, ``inpainting``, ``tiny``), a Hugging
        Face repo id (official or diffusers layout) or a local folder.

        ``dtype`` sets all components at once; ``unet_dtype`` / ``movq_dtype`` / ``text_encoder_dtype`` override
        it per component. ``offload=True`` keeps weights on the CPU and moves each component to ``device`` only
        while it runs. ``text_encoder_quantization`` = "8bit" | "4bit" needs bitsandbytes (a CUDA device).
        ``channels_last=True`` stores U-Net and MoVQ convolution weights NHWC (faster convolutions on GPUs with
        tensor cores; same outputs). ``movq_tiling=True`` encodes / decodes images with a side over the MoVQ tile
        (1024 px) in overlapping tiles, as KandiSuperRes does: less memory, slightly different pixels; off by
        default, as in the official pipelines (docs/sampling.md).
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
        pipe = cls(components, device=device, offload=offload, movq_tiling=movq_tiling)
        if channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.movq.to(memory_format=torch.channels_last)
        if compile:
            pipe.unet.compile()
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
        return self.unet.in_channels == 2 * self.latent_channels + 1

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
        with self._lock:
            plan = builder(self, request)
            images = self._execute(plan, generator, callback, progress)
            return plan.finish(images) if plan.finish else images

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

        Beautifiers are cached on the pipeline, so the same prompt is expanded once per session."""
        from .prompts import make_beautifier

        key = beautifier if isinstance(beautifier, (str, bool)) else id(beautifier)
        cache = self.__dict__.setdefault("_beautifiers", {})
        if key not in cache:
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
        if not sampler.guided and (s.guidance or plan.negative_prompts is not None):
            warnings.warn(
                f"the {s.sampler} sampler uses no classifier-free guidance: guidance and negative prompts are ignored",
                stacklevel=4,
            )
        if not plan.adapters and self.is_inpainting:
            raise ValueError("this is an inpainting U-Net: use inpaint() or outpaint()")
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
            denoiser = Denoiser(self.unet, cond, s.guidance if sampler.guided else 0.0, plan.adapters)
            x0 = None if plan.init_latents is None else plan.init_latents.to(x.device, torch.float32)
            run = SamplerRun(
                self.schedule, s.steps, noise, s.eta, s.threshold_percentile, x0, s.strength, callback, progress
            )
            latents = sampler.sample(denoiser, x, run)
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
            }
            if plan.original_prompts is not None:
                meta["original_prompt"] = plan.original_prompts[p]
            out.append(with_metadata(image, meta))
        return out

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
    def _decode(self, latents: torch.Tensor, rounding: str, chunk: int = 2) -> list[Image.Image]:
        p = self._movq_param()
        images = []
        for part in latents.split(chunk):
            decoded = self.movq.decode(part.to(p.device, p.dtype), tiled=self.movq_tiling).float()
            images.extend(tensor_to_pil(decoded, rounding))
        return images

    # -- placement / offload -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def placed(self, module: torch.nn.Module):
        """With offload, move ``module`` to the compute device only while it runs."""
        if not self.offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def to(self, device) -> "Kandinsky3":
        self.device = torch.device(device)
        for m in (self.unet, self.movq, self.text_encoder):
            m.to(self.device)
        return self
