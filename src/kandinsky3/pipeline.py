"""``Kandinsky3``: load once, then generate / edit / inpaint / outpaint — one sampling loop for every task."""

from __future__ import annotations

import contextlib
import random
import warnings
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from . import tasks
from .checkpoints import Components, load_components, save_components
from .diffusion import (Conditioning, Denoiser, NoiseSchedule, flash_timesteps, official_timesteps, sample_ddim,
                        sample_flash, sample_with_scheduler)
from .images import as_mask, as_pil, check_size, dilate_mask, fit_for_diffusion, tensor_to_pil, with_metadata
from .settings import GenerationSettings

DIFFUSERS_SCHEDULERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler",
                        "euler": "EulerDiscreteScheduler"}


class Kandinsky3:
    """The Kandinsky 3 family behind one object.

    >>> pipe = Kandinsky3.from_pretrained()            # the embedded nano model
    >>> [image] = pipe.generate("a red circle in the top left on a gray background", seed=0)
    """

    def __init__(self, components: Components, device: str | torch.device = "cpu", offload: bool = False):
        self.variant = components.variant
        self.unet = components.unet
        self.movq = components.movq
        self.text_encoder = components.text_encoder
        self.device = torch.device(device)
        self.offload = offload
        self.schedule = NoiseSchedule.named("cosine")

    @classmethod
    def from_pretrained(cls, name_or_path: str | None = None, *, device: str | None = None, dtype=None,
                        unet_dtype=None, movq_dtype=None, text_encoder_dtype=None, text_encoder_device=None,
                        text_encoder_quantization: str | None = None, offload: bool = False, compile: bool = False,
                        channels_last: bool = False, local_files_only: bool = False,
                        variant: str | None = None) -> "Kandinsky3":
        """Load a registered model (``nano`` by default, ``base``, ``flash``, ``inpainting``, ``tiny``), a Hugging
        Face repo id (official or diffusers layout) or a local folder.

        ``dtype`` sets all components at once; ``unet_dtype`` / ``movq_dtype`` / ``text_encoder_dtype`` override
        it per component. ``offload=True`` keeps weights on the CPU and moves each component to ``device`` only
        while it runs. ``text_encoder_quantization`` = "8bit" | "4bit" needs bitsandbytes (a CUDA device).
        ``channels_last=True`` stores U-Net and MoVQ convolution weights NHWC (faster convolutions on GPUs with
        tensor cores; same outputs).
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        load_device = "cpu" if offload else device
        components = load_components(
            name_or_path, device=load_device, unet_dtype=unet_dtype or dtype, movq_dtype=movq_dtype or dtype,
            text_encoder_dtype=text_encoder_dtype or dtype, text_encoder_device=text_encoder_device,
            quantization=text_encoder_quantization, local_files_only=local_files_only, variant=variant,
        )
        pipe = cls(components, device=device, offload=offload)
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

    def generate(self, prompt: str | list[str] = "", negative_prompt: str | list[str] | None = None, *,
                 generator: torch.Generator | None = None, progress: bool = True, beautify=None,
                 upscale=None, **settings) -> list[Image.Image]:
        """Text → image. ``settings``: steps, guidance, width, height, num_images, seed, sampler, eta,
        threshold_percentile (see :class:`GenerationSettings`). An empty prompt means unconditional generation.

        ``beautify``: True / "local" (an LLM), "template" (shapes world, no model), "server URL", or a
        :class:`~kandinsky3.prompts.Beautifier`; the prompt actually used is in each image's metadata
        (``prompt``, with ``original_prompt``).

        ``upscale``: 2 or 4 chains the default upscaler (:class:`~kandinsky3.superres.SuperRes`, nano) after
        generation; pass a ``SuperRes`` to use another one at its own scale."""
        s = self._settings(settings)
        check_size(s.width, s.height, self.size_multiple)
        prompts = self._prompts(prompt)
        originals = None
        if beautify:
            originals = prompts
            prompts = [self.beautify(p, beautify).prompt for p in prompts]
        start = tasks.text_to_image(len(prompts) * s.num_images, s.width, s.height, self.latent_channels,
                                    self.latent_factor)
        images = self._run("generate", prompts, negative_prompt, s, start, None, generator, progress, originals)
        return self._upscale(images, upscale, progress) if upscale else images

    def _upscale(self, images: list[Image.Image], upscale, progress: bool) -> list[Image.Image]:
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

    def edit(self, image, prompt: str | list[str] = "", strength: float = 0.3,
             negative_prompt: str | list[str] | None = None, *, generator=None, progress: bool = True,
             **settings) -> list[Image.Image]:
        """Image → image: noise the image's latent part-way (``strength`` of the schedule) and denoise it."""
        s = self._settings({**settings, "strength": strength})
        image = tasks.prepare_image(image, settings.get("width"), settings.get("height"), self.variant.size,
                                    self.size_multiple)
        s = replace(s, width=image.width, height=image.height)
        prompts = self._prompts(prompt)
        with self._placed(self.movq):
            latents = self._encode_image(image)
        start = tasks.image_to_image(latents, len(prompts) * s.num_images, s.strength)
        return self._run("edit", prompts, negative_prompt, s, start, None, generator, progress)

    def inpaint(self, image, mask, prompt: str | list[str] = "", negative_prompt: str | list[str] | None = None, *,
                dilate: bool = False, paste_back: bool = False, generator=None, progress: bool = True,
                **settings) -> list[Image.Image]:
        """Repaint where ``mask`` is 1 (white). ``dilate`` grows the mask like the official ``prepare_mask``;
        ``paste_back`` puts the original pixels back outside the mask (off by default, as in the official code)."""
        if not self.is_inpainting:
            raise ValueError(f"inpainting needs a U-Net with {2 * self.latent_channels + 1} input channels; this "
                             f"model's has {self.unet.in_channels}. Load one: Kandinsky3.from_pretrained('inpainting')")
        image = as_pil(image)
        user_mask = as_mask(mask, image.size)
        if dilate:
            user_mask = dilate_mask(user_mask)
        width, height = settings.pop("width", None), settings.pop("height", None)
        if width is None and height is None:
            width, height = fit_for_diffusion(image.width, image.height, self.variant.size, self.size_multiple)
        check_size(width, height, self.size_multiple)
        s = self._settings(settings)
        s = replace(s, width=width, height=height)
        resized = image.resize((width, height), Image.BICUBIC) if image.size != (width, height) else image
        m = tasks.resize_mask(user_mask, image.size, (width, height))
        prompts = self._prompts(prompt)
        batch = len(prompts) * s.num_images
        with self._placed(self.movq):
            extra = tasks.inpainting_inputs(self.movq, resized, m, batch)
        start = tasks.text_to_image(batch, width, height, self.latent_channels, self.latent_factor)
        images = self._run("inpaint", prompts, negative_prompt, s, start, extra, generator, progress)
        if paste_back:
            keep = (1.0 - m)[..., None]
            orig = np.asarray(resized, dtype=np.float32)
            images = [self._restamp(Image.fromarray((np.asarray(im, np.float32) * (1 - keep) + orig * keep)
                                                    .round().astype(np.uint8)), im) for im in images]
        return images

    def outpaint(self, image, prompt: str | list[str] = "", *, left: int = 0, right: int = 0, top: int = 0,
                 bottom: int = 0, **kwargs) -> list[Image.Image]:
        """Extend the canvas by the given margins (pixels) and inpaint the new border."""
        canvas, mask = tasks.outpaint_canvas(image, left, right, top, bottom, self.size_multiple)
        return self.inpaint(canvas, mask, prompt, width=canvas.width, height=canvas.height, **kwargs)

    # -- the one loop ------------------------------------------------------------------------------------------

    def _settings(self, overrides: dict) -> GenerationSettings:
        unknown = set(overrides) - set(GenerationSettings.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown setting(s) {sorted(unknown)}; valid: {sorted(GenerationSettings.__dataclass_fields__)}")
        return GenerationSettings(**{k: v for k, v in overrides.items() if v is not None}).resolve(self.variant)

    @staticmethod
    def _prompts(prompt) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompt must be a string or a non-empty list of strings")
        return prompts

    def _conditioning(self, prompts: list[str], negative, s: GenerationSettings,
                      extra: torch.Tensor | None) -> Conditioning:
        if isinstance(negative, str):
            negative = [negative] * len(prompts)
        if negative is not None and len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one, or one each")
        guided = s.sampler != "flash" and s.guidance > 0
        with self._placed(self.text_encoder):
            context, mask, neg_context, neg_mask = self.text_encoder.encode(prompts, negative if guided else None)
            if guided and neg_context is None:
                neg_context, neg_mask = self.text_encoder.unconditional(context)
        n = s.num_images
        rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        lengths = self.text_encoder.crop_lengths(mask, self.text_encoder.max_length)
        return Conditioning(rep(context), rep(mask), rep(neg_context) if guided else None,
                            rep(neg_mask) if guided else None, extra, context_lengths=rep(lengths))

    def _run(self, task: str, prompts, negative, s: GenerationSettings, start: tasks.Start, extra, generator,
             progress, original_prompts=None) -> list[Image.Image]:
        if s.sampler == "flash" and (s.guidance or negative is not None):
            warnings.warn("the Flash sampler uses no classifier-free guidance: guidance and negative prompts are ignored",
                          stacklevel=3)
        if extra is None and self.is_inpainting:
            raise ValueError("this is an inpainting U-Net: use inpaint() or outpaint()")
        seed = s.seed if s.seed is not None else (None if generator else random.randrange(2**32))
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(seed)
        cond = self._conditioning(prompts, negative, s, extra)
        noise = torch.randn(start.shape, generator=generator, device=generator.device, dtype=torch.float32)
        with self._placed(self.unet):
            noise = noise.to(self.device)
            denoiser = Denoiser(self.unet, cond, s.guidance if s.sampler != "flash" else 0.0)
            latents = self._sample(denoiser, noise, start, s, generator, progress)
        with self._placed(self.movq):
            images = self._decode(latents)
        negatives = [negative] * len(prompts) if isinstance(negative, str) else negative
        out = []
        for i, image in enumerate(images):
            p = i // s.num_images
            meta = {"task": task, "model": self.variant.name, "prompt": prompts[p],
                    "negative_prompt": None if negatives is None else negatives[p], "seed": seed,
                    "index": i, **{k: v for k, v in s.to_dict().items() if k != "seed"}}
            if original_prompts is not None:
                meta["original_prompt"] = original_prompts[p]
            out.append(with_metadata(image, meta))
        return out

    def _sample(self, denoiser, noise, start: tasks.Start, s: GenerationSettings, generator, progress):
        x0 = None if start.latents is None else start.latents.to(noise.device, torch.float32)
        if s.sampler == "k3":
            timesteps = official_timesteps(s.steps, self.schedule.num_timesteps)
            if x0 is not None:
                keep = max(1, int(s.steps * start.strength))
                timesteps = timesteps[-(keep + 1):]
                noise = self.schedule.q_sample(x0, timesteps[0], noise)
            return sample_ddim(denoiser, noise, self.schedule, timesteps, generator, s.eta, s.threshold_percentile,
                               progress)
        if s.sampler == "flash":
            timesteps = flash_timesteps(s.steps)
            if x0 is not None:
                timesteps = [t for t in timesteps if t < start.strength * 1000] or [timesteps[-1]]
                noise = x0
            return sample_flash(denoiser, noise, self.schedule, timesteps, generator, progress)
        scheduler = self._diffusers_scheduler(s.sampler)
        return sample_with_scheduler(denoiser, noise, scheduler, s.steps, generator, start.strength, progress, x0)

    @staticmethod
    def _diffusers_scheduler(name: str):
        import diffusers

        cls = getattr(diffusers, DIFFUSERS_SCHEDULERS[name])
        kwargs = dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000, prediction_type="epsilon")
        if name in ("ddpm", "ddim"):
            kwargs.update(clip_sample=False, timestep_spacing="trailing")
        return cls(**kwargs)

    # -- MoVQ --------------------------------------------------------------------------------------------------

    def _movq_param(self):
        return next(self.movq.parameters())

    @torch.no_grad()
    def _encode_image(self, image: Image.Image) -> torch.Tensor:
        from .images import pil_to_tensor

        p = self._movq_param()
        return self.movq.encode(pil_to_tensor(image).to(p.device, p.dtype)).float()

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor, chunk: int = 2) -> list[Image.Image]:
        p = self._movq_param()
        images = []
        for part in latents.split(chunk):
            images.extend(tensor_to_pil(self.movq.decode(part.to(p.device, p.dtype)).float()))
        return images

    @staticmethod
    def _restamp(new: Image.Image, old: Image.Image) -> Image.Image:
        new.info.update(old.info)
        return new

    # -- placement / offload -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _placed(self, module: torch.nn.Module):
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

