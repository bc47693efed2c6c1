"""Named model variants: configs, sampler defaults and where their files live."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from .models.movq import MoVQConfig
from .models.unet import UNetConfig

OFFICIAL_REPO = "ai-forever/Kandinsky3.1"
DIFFUSERS_REPO = "kandinsky-community/kandinsky-3"
NANO_DIR = Path(__file__).parent / "weights" / "nano"
NANO_FLASH_DIR = Path(__file__).parent / "weights" / "nano-flash"

# Dynamic thresholding of x0 (spec §4.2): the official text→image pipeline clips at the 0.99 quantile of |x0|, the
# inpainting pipeline at 0.95. The lower quantile rarely exceeds 1, so the picture the model is given is not scaled
# down at every step (on nano's latents 0.99 alone costs the known region 7 dB: docs/inpainting.md).
INPAINTING_THRESHOLD_PERCENTILE = 0.95


@dataclass(frozen=True)
class SamplerDefaults:
    """How a variant samples by default: the official K3 DDIM-η sampler or the Flash re-noising sampler."""

    kind: str = "k3"  # "k3" | "flash"
    steps: int = 50
    guidance: float = 3.0  # w in (w+1)·cond − w·uncond
    threshold_percentile: float | None = 0.99
    eta: float = 1.0

    def to_dict(self) -> dict:
        return dict(
            kind=self.kind,
            steps=self.steps,
            guidance=self.guidance,
            threshold_percentile=self.threshold_percentile,
            eta=self.eta,
        )


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    unet: UNetConfig
    movq: MoVQConfig = field(default_factory=MoVQConfig)
    sampler: SamplerDefaults = field(default_factory=SamplerDefaults)
    size: int = 1024  # default image side in pixels
    text_encoder: str = "google/flan-ul2"  # the T5 checkpoint whose encoder the variant was trained with
    hub_repo: str | None = OFFICIAL_REPO
    unet_file: str | None = None  # official layout, relative to the repo root
    projection_file: str | None = None
    movq_file: str | None = "weights/movq.pt"
    text_encoder_dir: str | None = "weights/flan_ul2_encoder"
    local_dir: Path | None = None  # weights shipped with the package
    inpainting: bool | None = None  # takes inpainting's extra channels; None: files that don't say (read the config)
    beautifier: str = "local"  # what beautify=True uses: an LLM, or "template" (the model's vocabulary.json)
    controlnet: str | None = "hed"  # what control() loads: a CONTROLNETS name, a hub id or a folder
    ip_adapter: str | None = "ai-forever/kandinsky3_ip_adapter"  # what variation / mix / image prompts load

    @property
    def is_inpainting(self) -> bool:
        """Whether the U-Net takes inpainting's extra input channels (keep-mask + masked-image latent after x_t).

        Declared by the registry's inpainting variant; a folder whose metadata doesn't say is read from its U-Net
        config (latent + masked-image latent + mask channels)."""
        if self.inpainting is not None:
            return self.inpainting
        return self.unet.num_channels == 2 * self.movq.embed_dim + 1

    @property
    def official_files(self) -> list[str]:
        files = [self.unet_file, self.projection_file, self.movq_file]
        return [f for f in files if f] + ([f"{self.text_encoder_dir}/*"] if self.text_encoder_dir else [])


_BASE_UNET = UNetConfig()

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant(
            "base",
            "Kandinsky 3.1: 3B U-Net, FLAN-UL2 encoder, 50 steps with guidance",
            _BASE_UNET,
            unet_file="weights/kandinsky3.pt",
            projection_file="weights/flan_ul2_encoder/projection.pt",
        ),
        Variant(
            "flash",
            "Kandinsky 3.1 Flash: the base U-Net distilled (ADD) to 4 steps, no guidance",
            _BASE_UNET,
            sampler=SamplerDefaults(kind="flash", steps=4, guidance=0.0, threshold_percentile=None),
            unet_file="weights/kandinsky3_flash.pt",
            projection_file="weights/flan_ul2_encoder/projection_flash.pt",
        ),
        Variant(
            "inpainting",
            "Kandinsky 3.1 inpainting: 9-channel U-Net (latent, mask, masked-image latent)",
            UNetConfig(num_channels=9),
            sampler=SamplerDefaults(guidance=4.0, threshold_percentile=INPAINTING_THRESHOLD_PERCENTILE),
            inpainting=True,
            unet_file="weights/kandinsky3_inpainting.pt",
            projection_file="weights/flan_ul2_encoder/projection_inpainting.pt",
        ),
        Variant(
            "small",
            "Kandinsky 3 Small: ≈1B U-Net with FLAN-T5 XL (2048-d); weights were never published",
            UNetConfig(
                model_channels=256, init_channels=128, time_embed_dim=1024, context_dim=2048, dim_mult=(1, 2, 4, 6)
            ),
            text_encoder="google/flan-t5-xl",
            hub_repo=None,
            movq_file=None,
            text_encoder_dir=None,
        ),
        Variant(
            "nano",
            "nano: tiny K3 trained by this project on the procedural shapes world (64 px), the default",
            UNetConfig(
                model_channels=64,
                init_channels=32,
                time_embed_dim=256,
                context_dim=128,
                groups=16,
                head_dim=32,
                dim_mult=(1, 2, 3),
                num_blocks=(2, 2, 2),
                add_cross_attention=(True, True, True),
                add_self_attention=(False, True, True),
            ),  # cross-attention at 8×8 too (docs/nano.md)
            movq=MoVQConfig(
                ch=32,
                ch_mult=(1, 2, 2, 4),
                num_res_blocks=1,
                attn_resolutions=(8,),
                resolution=64,
                tile_sample_min_size=64,
            ),
            sampler=SamplerDefaults(guidance=1.0),  # the best of a sweep for nano (docs/nano.md)
            beautifier="template",  # an LLM knows nothing of nano's 40 words; its vocabulary.json does
            controlnet="nano-controlnet",
            ip_adapter="nano-ip-adapter",  # trained on this U-Net with the nano CLIP (docs/ip_adapter.md)
            size=64,
            text_encoder="nano-t5",
            hub_repo=None,
            movq_file=None,
            text_encoder_dir=None,
            local_dir=NANO_DIR,
        ),
        Variant(
            "tiny",
            "random-weight test preset (every code path, no files, no meaning)",
            UNetConfig(
                model_channels=64,
                init_channels=32,
                time_embed_dim=128,
                context_dim=64,
                dim_mult=(1, 2, 2, 4),
                num_blocks=(2, 2, 2, 2),
            ),
            movq=MoVQConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, tile_sample_min_size=64),
            size=64,
            text_encoder="tiny-t5",
            controlnet="tiny",
            ip_adapter=None,
            hub_repo=None,
            movq_file=None,
            text_encoder_dir=None,
        ),
    ]
}
VARIANTS["nano-flash"] = replace(
    VARIANTS["nano"],
    name="nano-flash",
    description="nano distilled to 4 Flash steps by ADD (docs/flash.md); shares nano's T5 and MoVQ",
    sampler=SamplerDefaults(kind="flash", steps=4, guidance=0.0, threshold_percentile=None),
    local_dir=NANO_FLASH_DIR,
)
VARIANTS["nano-inpainting"] = replace(
    VARIANTS["nano"],
    name="nano-inpainting",
    description="nano fine-tuned for inpainting on object boxes + region captions (docs/inpainting.md); shares "
    "nano's T5 and MoVQ",
    unet=replace(VARIANTS["nano"].unet, num_channels=9),
    sampler=replace(VARIANTS["nano"].sampler, threshold_percentile=INPAINTING_THRESHOLD_PERCENTILE),
    inpainting=True,
    local_dir=Path(__file__).parent / "weights" / "nano-inpainting",
)
ALIASES = {
    OFFICIAL_REPO.lower(): "base",
    "kandinsky3": "base",
    "kandinsky3.1": "base",
    "k3": "base",
    "kandinsky3-flash": "flash",
    "kandinsky3-inpainting": "inpainting",
}
DEFAULT_VARIANT = "nano"


def get_variant(name: str) -> Variant:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in VARIANTS:
        raise ValueError(
            f"unknown model {name!r}: use one of {', '.join(VARIANTS)}, a Hugging Face repo id "
            f"(e.g. {OFFICIAL_REPO} or {DIFFUSERS_REPO}) or a local folder"
        )
    return VARIANTS[key]


def variant_for(named: Variant | None, variant: str | None) -> Variant | None:
    """The variant a load uses: ``variant`` (``--variant``) picks one of the U-Nets an official folder holds; a
    registered name (``named``) is one variant already, so another ``variant`` beside it is refused, not ignored."""
    if variant is None:
        return named
    if variant.lower() not in VARIANTS and variant.lower() not in ALIASES:
        raise ValueError(f"unknown variant {variant!r}: an official folder holds base, flash or inpainting U-Nets")
    chosen = get_variant(variant)
    if named is not None and chosen.name != named.name:
        raise ValueError(
            f"variant {variant!r} picks a U-Net of an official folder, but {named.name!r} is a registered model: "
            f"load {chosen.name!r} by name instead (from_pretrained({chosen.name!r}); CLI: --model {chosen.name}), "
            "or drop the variant"
        )
    return chosen


HED_CONTROLNET_REPO = "ai-forever/kandinsky3_controlnet_hed"
NANO_CONTROLNET_DIR = Path(__file__).parent / "weights" / "nano-controlnet"
#: named ControlNets (``Variant.controlnet``, ``from_pretrained(..., controlnet=NAME)``): a hub id, a folder, or None
#: for the random ``tiny`` test preset
CONTROLNETS: dict[str, str | Path | None] = {
    "hed": HED_CONTROLNET_REPO,  # the released HED ControlNet of Kandinsky 3.1 (base; also used beside Flash)
    "nano-controlnet": NANO_CONTROLNET_DIR,  # trained by this project on the shapes world (docs/controlnet.md)
    "tiny": None,
}

SUPERRES_REPO = "ai-forever/KandiSuperRes"
NANO_SR_DIR = Path(__file__).parent / "weights" / "nano-sr"


@dataclass(frozen=True)
class SuperResVariant:
    name: str
    description: str
    scale: int
    mode: str = "standard"  # standard | flash
    file: str | None = None  # in SUPERRES_REPO
    local_dir: Path | None = None


SUPERRES_VARIANTS: dict[str, SuperResVariant] = {
    v.name: v
    for v in [
        SuperResVariant(
            "x4", "KandiSuperRes 4×: 5 DPM-Solver++ steps over 1024-px views", 4, file="KandiSuperRes.ckpt"
        ),
        SuperResVariant("x2", "KandiSuperRes 2×", 2, file="KandiSuperRes_x2.ckpt"),
        SuperResVariant(
            "flash-x2",
            "KandiSuperRes Flash 2×: 4 steps + K3 Flash latent refine",
            2,
            mode="flash",
            file="KandiSuperRes_flash_x2.pt",
        ),
        SuperResVariant(
            "nano", "nano upscaler trained on the shapes world (64 → 256 px), the default", 4, local_dir=NANO_SR_DIR
        ),
        SuperResVariant("tiny", "random-weight test preset", 4),
    ]
}
