"""``kandinsky3`` command line: generate, edit, inpaint, outpaint, convert, info."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import stat
import sys
import typing
import warnings
from pathlib import Path

from .requests import REQUESTS

EXAMPLES = {
    "generate": """examples:
  kandinsky3 generate "a red circle in the top left on a gray background" --seed 0 --out circle.png
  kandinsky3 generate "a large blue star" --num-images 4 --out stars.png        # stars-0.png … stars-3.png
  kandinsky3 generate "a cat in a hat" --model base --width 1024 --height 768 --negative "blurry"
  kandinsky3 generate "a cat in a hat" --model flash --dtype bf16               # 4 steps, no guidance
  kandinsky3 generate "a star" --beautify template                               # fill unstated attributes
  kandinsky3 generate "on a white background" --image photo.png --image-weight 0.7   # IP-Adapter image prompt
  kandinsky3 generate "a cat" --model base --beautify "server http://127.0.0.1:8000"   # vLLM / llama.cpp / Ollama
  kandinsky3 generate --prompts prompts.txt --out-dir out --seed 0 1 2 3          # one PNG per (prompt, seed)
  accelerate launch --num_processes 8 -m kandinsky3.cli generate --prompts p.jsonl --out-dir out   # sharded""",
    "edit": """examples:
  kandinsky3 edit photo.png "the same scene in winter" --strength 0.5 --out winter.png""",
    "inpaint": """examples:
  kandinsky3 inpaint photo.png mask.png "a bowl of fruit" --model inpainting --out fruit.png
  (mask: white / 1 = repaint, black / 0 = keep; the same size as the image)""",
    "outpaint": """examples:
  kandinsky3 outpaint photo.png "a wide beach" --left 256 --right 256 --model inpainting --out wide.png""",
    "control": """examples:
  kandinsky3 control photo.png "a watercolour city" --scale 0.8 --out city.png     # keeps photo.png's edges
  kandinsky3 control photo.png "a large blue star" --end 0.6 --seed 1 --out star.png   # steer the first 60 % only
  kandinsky3 control sketch.png "a cat" --model base --init-image cat.png --strength 0.7
  (the model's own ControlNet loads on first use — base / flash: ai-forever/kandinsky3_controlnet_hed; nano's
   does not ship yet, docs/controlnet.md — or give one with --controlnet FOLDER)""",
    "variation": """examples:
  kandinsky3 variation photo.png --num-images 4 --seed 0 --out var.png    # var-0.png … var-3.png
  kandinsky3 variation photo.png --early-boost 1 --seed 0 --out plain.png   # no early boost (as released)
  kandinsky3 variation photo.png --image-weight 0.7 --model base --width 1024 --height 1024
  (the IP-Adapter loads on first use — nano: its own, in the package; base: ai-forever/kandinsky3_ip_adapter —
   or give one with --ip-adapter FOLDER; docs/ip_adapter.md)""",
    "mix": """examples:
  kandinsky3 mix photo.png small.png --weights 0.6 0.4 --seed 0 --out mix.png
  kandinsky3 mix photo.png small.png --prompt "on a white background" --mix-rule mean""",
    "convert": """examples:
  kandinsky3 convert ./Kandinsky3.1 ./k3-diffusers --to diffusers --variant base
  kandinsky3 convert ./k3-diffusers ./k3-official --to official
  kandinsky3 convert ./Kandinsky3.1 ./k3-flash --to native --variant flash     # safetensors
  kandinsky3 convert ./kandinsky3_ip_adapter ./k3-ip-adapter --to native        # the released IP-Adapter""",
    "train": """examples:
  kandinsky3 train movq --config configs/nano/movq.yaml
  kandinsky3 train superres --config configs/nano/superres.yaml --output-dir runs/my-sr   # exports to runs/my-sr/export
  kandinsky3 train toy_gan --config configs/toy_gan.yaml                                  # two optimizers, seconds
  accelerate launch --num_processes 8 -m kandinsky3.cli train diffusion --config my.yaml   # 8 GPUs, DDP
  (an interrupted run resumes from the newest complete checkpoint in OUTPUT_DIR/checkpoints when started again;
   exports go to OUTPUT_DIR/export unless --export-dir names another folder)""",
    "eval": """examples:
  kandinsky3 eval alignment --model nano --num 500     # judge-read alignment at the default guidance and at 0
  kandinsky3 eval movq --model nano --num 500          # MoVQ reconstruction PSNR on held-out renders
  kandinsky3 eval superres --world 100                 # nano upscaler vs bicubic / Lanczos on world scenes
  kandinsky3 eval superres --hr-dir ./DIV2K_valid_HR --model x4 --num 100
  kandinsky3 eval flash --model nano-flash --teacher nano   # the Flash student vs its teacher and 4-step baselines
  kandinsky3 eval ip-adapter --references 300 --pairs 200  # variation, image + text, mixing (judged)
  kandinsky3 eval clipscore --num 200                       # nano CLIP: caption retrieval and CLIP score
  kandinsky3 eval edges --num 300                      # edge extractors vs the world's true outlines (F-score)
  kandinsky3 eval controlnet --num 300                 # nano's ControlNet: layout from the hint (judge-read)
  kandinsky3 eval inpainting --model nano-inpainting --compare runs/nano-inpainting-random/export   # AP50 etc.""",
    "caption-regions": """examples:
  kandinsky3 caption-regions ./photos --model llava-hf/llava-1.5-7b-hf --batch-size 8   # → ./photos/regions.jsonl
  (boxes: ./photos/annotations.json, COCO style; an interrupted run resumes; docs/inpainting.md)""",
    "serve": """examples:
  kandinsky3 serve --models nano                       # http://127.0.0.1:8000/ (web UI), /docs (API)
  KANDINSKY3_API_KEY=secret kandinsky3 serve --models nano base --host 0.0.0.0 --devices cuda:0 cuda:1""",
    "upscale": """examples:
  kandinsky3 upscale small.png --scale 4 --out big.png                  # the nano upscaler
  kandinsky3 upscale photo.png --model x4 --dtype fp16 --out photo4k.png  # KandiSuperRes, 1024-px views
  kandinsky3 upscale photo.png --model x4 --window 0                     # whole image as one view""",
    "edges": """examples:
  kandinsky3 edges photo.png edges.png                              # soft edges: offline, no download
  kandinsky3 edges photo.png edges.png --method hed --hed-weights ./annotators/ControlNetHED.pth --safe""",
    "info": """examples:
  kandinsky3 info                      # the embedded nano model
  kandinsky3 info ./Kandinsky3.1 --variant flash""",
}


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="nano (default), base, flash, inpainting, tiny, a hub id or a folder")
    g.add_argument("--variant", default=None, help="which U-Net of an official folder: base, flash, inpainting")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="weights dtype for all parts")
    g.add_argument("--text-encoder-dtype", default=None, choices=["fp32", "fp16", "bf16"])
    g.add_argument(
        "--text-encoder-quantization",
        default=None,
        choices=["8bit", "4bit"],
        help="load the T5 encoder with bitsandbytes (CUDA)",
    )
    g.add_argument(
        "--offload", action="store_true", help="keep weights on the CPU, move each part to the device in turn"
    )
    g.add_argument(
        "--stream-text-encoder",
        action="store_true",
        help="keep the text encoder on the CPU and stream its blocks to the device one at a time while it encodes",
    )
    g.add_argument(
        "--memory",
        default=None,
        choices=["16gb"],
        help="a memory preset: 16gb = bf16, streamed text encoder, tiled MoVQ (docs/performance.md)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    g.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay the U-Net step from CUDA graphs (CUDA only; not with --offload)",
    )
    g.add_argument(
        "--movq-tiling",
        action="store_true",
        help="encode/decode sides over 1024 px in overlapping tiles (KandiSuperRes style): less memory, "
        "slightly different pixels; off as in the official pipelines",
    )


def _add_part_args(p: argparse.ArgumentParser, command: str):
    """The add-on networks a command uses, when another than the model's own is wanted (a folder or a hub id)."""
    g = p.add_argument_group("add-ons")
    if command == "control":
        g.add_argument(
            "--controlnet",
            default=None,
            help="a ControlNet: name (nano-controlnet, hed), folder (native or released layout) or hub id "
            "(default: the model's own, docs/controlnet.md)",
        )
    if command in ("generate", "variation", "mix"):
        g.add_argument(
            "--ip-adapter",
            default=None,
            help="an IP-Adapter: name, folder (native or released layout) or hub id (default: the model's own; "
            "used by image prompts, docs/ip_adapter.md)",
        )
        g.add_argument(
            "--image-encoder",
            default=None,
            help="the CLIP image encoder for --ip-adapter (default: the one the adapter names)",
        )


def _option_type(hint):
    """argparse ``type`` for a request field's annotation: the first of int / float / str it admits."""
    args = typing.get_args(hint) or (hint,)
    for t in (bool, int, float, str):
        if t in args or any(typing.get_origin(a) is list and typing.get_args(a) == (t,) for a in args):
            return t
    return str  # images, masks, beautifier backends: given as text (a path, a name)


def _add_request_args(p: argparse.ArgumentParser, request_cls):
    """One argument per field of the request (its name, type, default and help): the CLI is derived, not written."""
    hints = typing.get_type_hints(request_cls)
    g = p.add_argument_group("request", f"the fields of kandinsky3.{request_cls.__name__}")
    for f in request_cls.task_fields():
        cli = dict(f.metadata.get("cli", {}))
        positional = cli.pop("positional", False)
        kind = _option_type(hints[f.name])
        default = None if f.default is dataclasses.MISSING else f.default
        help_text = f.metadata.get("help", "")
        if positional:
            g.add_argument(f.name, default=default, help=help_text, **cli)
            continue
        names = [f"--{f.name.replace('_', '-')}"] + (["--negative"] if f.name == "negative_prompt" else [])
        if kind is bool:
            g.add_argument(*names, dest=f.name, action="store_true", default=default, help=help_text)
        else:
            g.add_argument(*names, dest=f.name, type=kind, default=default, help=help_text, **cli)


OUT_HELP = (
    "output image: .png, .jpg / .jpeg or .webp by its extension (settings in its metadata); with several images, "
    "-0, -1, … are appended. An existing file is not replaced without --overwrite"
)
PROGRESS_HELP = "hide the progress bars (also hidden when stderr is not a terminal)"


def _add_output_args(p: argparse.ArgumentParser, default_out: str = "kandinsky3.png", force: bool = True):
    g = p.add_argument_group("output")
    g.add_argument("--out", default=default_out, help=OUT_HELP + f" (default {default_out})")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)
    if force:
        g.add_argument(
            "--force",
            action="store_true",
            help="run a size whose estimated memory exceeds the device's (refused by default; docs/errors.md)",
        )


def request_from_args(request_cls, args):
    """The request a parsed command line describes (a single ``--seed`` stays one batch seed)."""
    values = {f.name: getattr(args, f.name) for f in request_cls.task_fields()}
    if isinstance(values.get("seed"), list) and len(values["seed"]) == 1:
        values["seed"] = values["seed"][0]
    return request_cls(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kandinsky3",
        description="Kandinsky 3.1 image generation.",
        formatter_class=_formatter,
        epilog=EXAMPLES["generate"],
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"kandinsky3 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # name → its parser (for the errors main() raises after parsing)

    helps = {
        "generate": "text → image",
        "edit": "image → image",
        "inpaint": "repaint the white part of a mask",
        "outpaint": "extend the canvas and paint the new border",
        "control": "ControlNet: a new picture with the edges (layout) of an image",
        "variation": "IP-Adapter: variations of a picture (no text)",
        "mix": "IP-Adapter: mix pictures with weights (and optional text)",
    }
    for request_cls in REQUESTS:
        name = request_cls.command
        p = sub.add_parser(
            name, help=helps[name], formatter_class=_formatter, epilog=EXAMPLES[name], description=request_cls.__doc__
        )
        _add_request_args(p, request_cls)
        _add_model_args(p)
        _add_part_args(p, name)
        _add_output_args(p)
        if name == "generate":
            from .batch import add_batch_args  # argparse only: the batch machinery loads when --prompts is given

            add_batch_args(p)

    p = sub.add_parser(
        "convert",
        help="convert between official .pt, diffusers and safetensors layouts",
        formatter_class=_formatter,
        epilog=EXAMPLES["convert"],
    )
    p.add_argument("src", help="model folder (official, diffusers or native layout)")
    p.add_argument("dst", help="output folder")
    p.add_argument(
        "--to",
        required=True,
        choices=["official", "diffusers", "native", "fork"],
        help="a model: official, diffusers or native; an IP-Adapter folder: native or fork (the released layout)",
    )
    p.add_argument("--variant", default=None, help="for official folders: base (default), flash or inpainting")
    p.add_argument("--overwrite", action="store_true", help="write into DST even if it is not empty")

    p = sub.add_parser(
        "train",
        help="train a model from a YAML config with a recipe (movq, diffusion, superres, toy_gan, …)",
        formatter_class=_formatter,
        epilog=EXAMPLES["train"],
    )
    # the names live in training.recipes.RECIPES and are checked when the command runs: importing the training
    # stack (accelerate, scipy) to build the parser would make every command need the [train] extra
    p.add_argument("recipe", help="a recipe of training.recipes.RECIPES: movq, diffusion, superres, toy_gan, …")
    p.add_argument("--config", required=True, help="YAML training config (see configs/ and docs/training.md)")
    p.add_argument("--output-dir", default=None, help="override output_dir")
    p.add_argument(
        "--export-dir",
        default=None,
        help="write the exported model here instead of OUTPUT_DIR/export (the nano rebuild names the "
        "package's weights folder this way)",
    )
    p.add_argument("--steps", type=int, default=None, help="override the total number of steps")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this invocation")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="end within this wall time: the run measures its speed and shortens --steps (the "
        "learning-rate schedule follows), then exports as usual",
    )
    p.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"])
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress output (a terminal otherwise gets a bar, a log file one line per logged step)",
    )

    p = sub.add_parser(
        "eval",
        help="measure a model: text alignment (shapes world) or MoVQ reconstruction",
        formatter_class=_formatter,
        epilog=EXAMPLES["eval"],
    )
    p.add_argument(
        "what",
        choices=[
            *("alignment", "movq", "superres", "flash", "edges", "inpainting", "controlnet"),
            *("ip-adapter", "clipscore"),
        ],
    )
    p.add_argument("--hr-dir", default=None, help="superres: a folder of high-res images (LR = bicubic downscale)")
    p.add_argument("--world", type=int, default=None, help="superres: N held-out shapes-world scenes instead")
    p.add_argument("--scale", type=int, default=4, choices=[2, 4])
    p.add_argument(
        "--model",
        default=None,
        help="nano (default) or a model folder trained on the shapes world (flash: the distilled student)",
    )
    p.add_argument("--teacher", default="nano", help="flash: the model the Flash student was distilled from")
    p.add_argument("--num", type=int, default=500, help="number of captions / images (default 500)")
    p.add_argument("--held-out", type=int, default=None, help="captions with held-out colour+shape pairs (num/5)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None, help="default: the model's (1.0 for nano)")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the comparison run (alignment: guidance 0; controlnet: the plain model without the ControlNet)",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--hed-weights", default=None, help="edges: also score HED with this ControlNetHED.pth")
    p.add_argument("--controlnet", default=None, help="controlnet: a ControlNet folder (default: the model's own)")
    p.add_argument("--ip-adapter", default=None, help="ip-adapter: an adapter folder (default: the model's own)")
    p.add_argument("--clip", default="nano-clip", help="ip-adapter, clipscore: the CLIP model (default nano-clip)")
    p.add_argument("--references", type=int, default=300, help="ip-adapter: references per test (default 300)")
    p.add_argument("--pairs", type=int, default=200, help="ip-adapter: image pairs mixed at (0.5, 0.5) (default 200)")
    p.add_argument(
        "--early-boost", type=float, default=None, help="ip-adapter: early image boost (default: the adapter's)"
    )
    p.add_argument(
        "--early-fraction", type=float, default=None, help="ip-adapter: the steps it covers (default: the adapter's)"
    )
    p.add_argument(
        "--baseline",
        default="nano",
        help="inpainting: the text→image model inpainting by latent blending ('none': skip)",
    )
    p.add_argument("--compare", action="append", default=[], help="inpainting: another inpainting model (repeatable)")
    p.add_argument("--grid", default=None, help="inpainting: also save a picture grid (PNG) of the first scenes")

    p = sub.add_parser(
        "caption-regions",
        help="caption every object box of a COCO-style dataset with a vision-language model (inpainting data)",
        formatter_class=_formatter,
        epilog=EXAMPLES["caption-regions"],
    )
    p.add_argument("root", help="the image folder (boxes in ROOT/annotations.json unless --annotations)")
    p.add_argument("--model", required=True, help="a transformers image-text-to-text model: hub id or folder")
    p.add_argument("--annotations", default=None, help="COCO-style JSON with the boxes")
    p.add_argument("--manifest", default=None, help="the JSONL to write / resume (default ROOT/regions.jsonl)")
    p.add_argument("--margin", type=float, default=0.2, help="context around each box, × its side (default 0.2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt", default=None, help="the question asked about each crop (chat models)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--device", default="cpu")

    p = sub.add_parser(
        "upscale",
        help="super-resolution (KandiSuperRes) of an image",
        formatter_class=_formatter,
        epilog=EXAMPLES["upscale"],
    )
    p.add_argument("image")
    p.add_argument("--scale", type=int, default=None, choices=[2, 4], help="2 or 4 (default: the model's)")
    p.add_argument("--model", default=None, help="nano (default), x4, x2, flash-x2, tiny or a folder")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=None, help="view size in output pixels (0: the whole image)")
    p.add_argument("--stride", type=int, default=None, help="view stride in output pixels (default 800 for 1024)")
    p.add_argument("--view-batch-size", type=int, default=None, help="views per U-Net batch (default 15)")
    p.add_argument(
        "--blend",
        default=None,
        choices=["ramp", "uniform"],
        help="how overlapping views merge: ramp (default; fades view edges, no seams) or uniform "
        "(the official plain average)",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    _add_output_args(p, "upscaled.png", force=False)

    from .serve.config import add_serve_args  # the standard library only: FastAPI loads when the server starts

    add_serve_args(
        sub.add_parser(
            "serve",
            help='HTTP service: jobs API, web UI, metrics (pip install -e ".[serve]")',
            formatter_class=_formatter,
            epilog=EXAMPLES["serve"],
        )
    )

    p = sub.add_parser(
        "edges",
        help="the edge map of an image (a ControlNet hint): soft (offline) or HED",
        formatter_class=_formatter,
        epilog=EXAMPLES["edges"],
    )
    p.add_argument("image", help="input image (PNG, JPEG, WebP; grey or RGBA is converted to RGB)")
    p.add_argument("out", help="output edge map: .png, .jpg / .jpeg or .webp (RGB, white edges on black)")
    p.add_argument(
        "--method",
        default="soft",
        choices=["soft", "hed"],
        help="soft: classical Sobel + blur, no download (default); hed: the HED network (ControlNetHED.pth)",
    )
    p.add_argument(
        "--hed-weights",
        default=None,
        help="hed: ControlNetHED.pth / .safetensors file or hub id (default lllyasviel/Annotators/ControlNetHED.pth)",
    )
    p.add_argument("--safe", action="store_true", help="safe-step quantisation of the map to 0, ½ and 1")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser(
        "info",
        help="what a model folder holds, with parameter counts",
        formatter_class=_formatter,
        epilog=EXAMPLES["info"],
    )
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--variant", default=None)
    return parser


def _pipeline(args):
    from .pipeline import Kandinsky3

    pipe = Kandinsky3.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        text_encoder_dtype=args.text_encoder_dtype,
        text_encoder_quantization=args.text_encoder_quantization,
        offload=args.offload,
        stream_text_encoder=args.stream_text_encoder,
        memory=args.memory,
        cuda_graph=args.cuda_graph,
        compile=args.compile,
        variant=args.variant,
        movq_tiling=args.movq_tiling,
        controlnet=getattr(args, "controlnet", None),
    )
    if getattr(args, "ip_adapter", None) or getattr(args, "image_encoder", None):
        pipe.get_ip_adapter(args.ip_adapter, image_encoder=args.image_encoder)
    return pipe


# -- checks made before any model loads ---------------------------------------------------------------------------


def _progress(args) -> bool:
    """Progress bars only when wanted and stderr is a terminal (a log file gets no carriage-return walls); when
    off, the loading bars of transformers ("Loading weights") and of hub downloads are off too."""
    show = not args.no_progress and sys.stderr.isatty()
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    (enable_progress_bars if show else disable_progress_bars)()
    (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()
    return show


def _check_device(device: str | None):
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device}: this torch {torch.__version__} has no usable CUDA (a CPU-only build, or no GPU "
                "visible); use --device cpu, or install a CUDA build of torch"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: use cpu, cuda, cuda:N or mps")


def _check_positive(**values):
    """Whole-number options that must be ≥ 1 when given."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def output_paths(out: str, count: int, overwrite: bool, flag: str = "--out") -> list[Path]:
    """The files ``count`` images go to (``-0``, ``-1``, … appended for several), checked before any work: a known
    image extension, an existing writable folder, not a folder, and no existing file unless ``overwrite``.
    ``flag``: how the messages name the argument (``--out``, or a positional's name)."""
    from .images import image_format

    out = Path(out).expanduser()
    if out.is_dir():
        raise ValueError(f"{flag} {out} is a folder; give a file name, e.g. {out / 'image.png'}")
    image_format(out)
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]
    folder = out.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist; create it first"
        raise ValueError(f"{flag} {out}: {folder} {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: the folder {folder} is not writable; choose another {flag}")
    for path in paths:
        if path.is_dir():
            raise ValueError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'image.png'}")
        if path.exists():
            if not overwrite:
                raise ValueError(f"{path} exists; pass --overwrite to replace it, or choose another {flag}")
            if not os.access(path, os.W_OK) or not path.stat().st_mode & stat.S_IWUSR:
                raise ValueError(f"{path} is read-only; make it writable or choose another {flag}")
    return paths


def _known_variant(args):
    """The registered variant ``--model`` names, or None for a folder or hub id (known once loaded); an unknown
    plain name is an error here, before anything loads."""
    from .registry import DEFAULT_VARIANT, get_variant, variant_for

    text = args.model or DEFAULT_VARIANT
    if Path(text).expanduser().exists() or "/" in text:
        return None
    return variant_for(get_variant(text), args.variant)  # raises for an unknown name or a clashing --variant


def _check_task_fits(request, variant):
    """A task the named model's U-Net cannot do (inpainting on a text→image model, or the reverse), refused before
    loading: the registry knows which U-Net a name has."""
    from .requests import Inpaint, Outpaint

    inpainting = isinstance(request, (Inpaint, Outpaint))
    if inpainting and not variant.is_inpainting:
        raise ValueError(
            f"{request.command} needs an inpainting model (a U-Net with the masked-image input channels); "
            f"{variant.name} is a text→image model: use --model inpainting (Kandinsky 3.1's, downloaded) or "
            "--model FOLDER (an inpainting model you trained, docs/inpainting.md)"
        )
    if variant.is_inpainting and not inpainting:
        raise ValueError(
            f"{variant.name} is an inpainting model: it runs `kandinsky3 inpaint` / `outpaint`; for "
            f"{request.command} use a text→image model (--model base, flash or nano)"
        )


def _check_before_loading(request, variant, args):
    """What a registered model's request is refused for before the model loads: a task its U-Net cannot do, a size
    it cannot take or that is estimated not to fit in memory."""
    _check_task_fits(request, variant)
    _check_size(request, variant, args)


def _planned_size(request, variant, multiple: int) -> tuple[int, int]:
    """The picture size a request will be run at (what tasks.py computes), for the checks before loading."""
    from .images import fit_for_diffusion
    from .requests import Mix, Outpaint, TextToImage, Variation

    if isinstance(request, (TextToImage, Variation, Mix)):  # the settings' size (a reference image's does not count)
        s = request.resolve(variant)
        return s.width, s.height
    image = request.image
    if isinstance(request, Outpaint):
        w, h = image.width + request.left + request.right, image.height + request.top + request.bottom
        return w + (-w) % multiple, h + (-h) % multiple
    if request.width is None and request.height is None:
        return fit_for_diffusion(image.width, image.height, variant.size, multiple)
    return request.width or image.width, request.height or image.height


def _check_size(request, variant, args):
    """Size multiple and estimated memory of the run; refused above the device's memory unless ``--force``."""

    from .devices import default_device
    from .images import check_size
    from .pipeline import FUSED_ATTENTION_DEVICES, MEMORY_PRESETS, device_memory, estimate_memory

    multiple = variant.movq.downsample_factor * variant.unet.downsample_factor
    width, height = _planned_size(request, variant, multiple)
    check_size(width, height, multiple)
    if args.force:
        return
    device = default_device(args.device)
    preset = MEMORY_PRESETS[args.memory](device) if getattr(args, "memory", None) else {}
    tiled = args.movq_tiling or preset.get("movq_tiling", False)
    element_bytes = 2 if (args.dtype or preset.get("dtype")) in ("fp16", "bf16") else 4
    scores = device.type not in FUSED_ATTENTION_DEVICES
    branches = 2 if request.guidance_for(variant) else 1
    prompt = getattr(request, "prompt", None)  # a list: a batch from a prompts file
    prompts = len(prompt) if isinstance(prompt, list) else 1
    pictures = prompts * request.num_images
    need = estimate_memory(variant, width, height, pictures, tiled, scores, element_bytes, device.type, branches)
    have = device_memory(device)
    if need > have:
        from .requests import Outpaint

        smaller = [
            "smaller --left/--right/--top/--bottom" if isinstance(request, Outpaint) else "a smaller --width/--height"
        ]
        if prompts > 1:
            smaller.append("a smaller --batch-size")
        elif request.num_images > 1:
            smaller.append("fewer --num-images")
        if not tiled:
            smaller.append("--movq-tiling")
        raise ValueError(
            f"{pictures} × {width}x{height} needs an estimated {need / 2**30:,.1f} GiB, more than the "
            f"{have / 2**30:,.0f} GiB of {device}; use {' or '.join(smaller)}, or --force to try anyway"
        )


def _generate(args) -> list[Path]:
    from .images import as_mask, as_pil

    request_cls = next(r for r in REQUESTS if r.command == args.command)
    _check_device(args.device)
    if getattr(args, "out_dir", None) is not None:
        raise ValueError("--out-dir is for batches (--prompts FILE); for one prompt name the picture with --out")
    for name in ("image", "init_image"):  # every input picture is read (and refused) before the model loads
        if getattr(args, name, None) is not None:
            setattr(args, name, as_pil(getattr(args, name)))
    if getattr(args, "images", None):
        args.images = [as_pil(image) for image in args.images]
    if getattr(args, "mask", None) is not None:
        args.mask = as_mask(args.mask, args.image.size)
    request = request_from_args(request_cls, args)  # validated before the model loads
    if args.text_encoder_quantization:
        from .devices import default_device
        from .pipeline import check_quantization

        check_quantization(args.text_encoder_quantization, default_device(args.device))
    if isinstance(request.seed, list) and len(request.seed) != request.num_images:  # one prompt on the CLI
        images = f"{request.num_images} image{'s' if request.num_images != 1 else ''}"
        raise ValueError(f"{len(request.seed)} seeds for {images}: give one seed, or one per image (--num-images)")
    variant = _known_variant(args)
    if variant is not None:
        _check_before_loading(request, variant, args)
    paths = output_paths(args.out, request.num_images, args.overwrite)
    progress = _progress(args)
    pipe = _pipeline(args)
    if variant is None:
        _check_size(request, pipe.variant, args)
    images = pipe.run(request, progress=progress)
    return _save_all(images, paths)


def _generate_batch(args) -> dict:
    """``generate --prompts FILE --out-dir DIR``: one PNG per (prompt, seed) and a manifest, resumable, sharded over
    the processes of ``accelerate launch`` (docs/serve.md, "Batch generation")."""
    from .batch import run_from_args

    _check_device(args.device)
    args.no_progress = not _progress(args)

    def load(device):
        if device is not None:
            args.device = device
        return _pipeline(args)

    def check(requests):  # a registered model is refused before it loads, as for one prompt
        variant = _known_variant(args)
        for request in requests if variant is not None else ():
            _check_before_loading(request, variant, args)

    summary = run_from_args(args, load, check)
    print(json.dumps(summary))
    return summary


def _upscale(args) -> list[Path]:
    from .images import as_pil
    from .requests import MAX_SEED

    _check_device(args.device)
    _check_positive(steps=args.steps, stride=args.stride, view_batch_size=args.view_batch_size)
    from .superres import check_steps

    check_steps(args.steps)
    if args.window is not None and args.window < 0:
        raise ValueError(f"--window must be 0 (the whole image) or a positive size, got {args.window}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {args.seed}")
    paths = output_paths(args.out, 1, args.overwrite)
    image = as_pil(args.image)
    progress = _progress(args)
    from .superres import SuperRes

    sr = SuperRes.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    upscaled = sr.upscale(
        image,
        args.scale,
        args.steps,
        args.seed,
        window=args.window,
        stride=args.stride,
        view_batch_size=args.view_batch_size,
        blend=args.blend,
        progress=progress,
    )
    return _save_all([upscaled], paths)


def _save_all(images, paths: list[Path]) -> list[Path]:
    from .images import save_image

    assert len(images) == len(paths), (len(images), len(paths))  # one prompt: num_images pictures
    for image, path in zip(images, paths):
        save_image(image, path)
        print(path)
    return paths


def _convert(args):
    from .checkpoints import convert
    from .registry import VARIANTS, get_variant

    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()
    if not src.exists() and args.src.lower() in VARIANTS and VARIANTS[args.src.lower()].local_dir is not None:
        src = VARIANTS[args.src.lower()].local_dir  # a model in the package, by its name (nano, nano-flash, …)
    if not src.exists():
        raise FileNotFoundError(f"model folder not found: {src}")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst} is a file; give a folder to write the model into")
    if dst.exists() and src.resolve() == dst.resolve():
        raise ValueError(f"{src} and {dst} are the same folder; write the conversion somewhere else")
    if dst.is_dir() and any(dst.iterdir()) and not args.overwrite:
        raise ValueError(f"{dst} is not empty; pass --overwrite to write into it, or choose another folder")
    from .checkpoints.controlnet import convert_controlnet, is_controlnet_folder

    if is_controlnet_folder(src):  # a ControlNet alone: released (diffusers-fork) ↔ native
        convert_controlnet(src, dst, args.to)
        print(f"wrote {dst} (ControlNet, {args.to} layout)")
        return
    from .checkpoints.ip_adapter import convert_ip_adapter, is_ip_adapter_folder

    if is_ip_adapter_folder(src):  # an IP-Adapter: native ↔ the released fork layout (docs/ip_adapter.md)
        if args.to not in ("native", "fork"):
            raise ValueError(f"{src} is an IP-Adapter: convert it --to native or --to fork (the released layout)")
        raw = convert_ip_adapter(src, dst, args.to)
        print(f"wrote {dst} (IP-Adapter, {args.to} layout, {raw.name})")
        return
    if args.to == "fork":
        raise ValueError("--to fork is the released IP-Adapter layout; this folder holds no IP-Adapter")
    raw = convert(src, dst, args.to, get_variant(args.variant) if args.variant else None)
    print(f"wrote {dst} ({args.to} layout, variant {raw.variant.name})")


def _edges(args):
    from .edges import extract_edges
    from .images import open_image, save_image

    if args.method != "hed" and args.hed_weights is not None:
        raise ValueError("--hed-weights is only used with --method hed")
    (path,) = output_paths(args.out, 1, args.overwrite, flag="OUT")
    edges = extract_edges(open_image(args.image), args.method, args.hed_weights, safe=args.safe)
    save_image(edges, path)
    print(path)


def _info(args):
    from .checkpoints import layouts
    from .checkpoints.loading import resolve

    root, variant = resolve(args.model, variant_name=args.variant)
    if root is None:
        print(f"{variant.name}: {variant.description} (in-memory preset, no files)")
        return
    raw = layouts.read(root, variant)
    count = lambda sd: sum(t.numel() for t in sd.values())  # noqa: E731
    print(f"folder:      {root}  ({layouts.detect_layout(root)} layout)")
    print(f"variant:     {raw.variant.name} — {raw.variant.description}")
    print(f"sampler:     {raw.variant.sampler.to_dict()}  default size {raw.variant.size}px")
    print(
        f"U-Net:       {len(raw.unet)} tensors, {count(raw.unet):,} parameters, "
        f"{raw.variant.unet.num_channels} input channels"
    )
    print(f"projection:  {count(raw.projection):,} parameters  ({tuple(raw.projection['0.weight'].shape)})")
    print(f"MoVQ:        {len(raw.movq)} tensors, {count(raw.movq):,} parameters")
    print(f"null emb.:   {'yes' if raw.null_embedding is not None else 'no (diffusers unconditional branch)'}")
    if raw.text_encoder_dir is not None:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(raw.text_encoder_dir)
        print(
            f"text enc.:   T5 d_model {cfg.d_model}, {cfg.num_layers} layers, vocab {cfg.vocab_size}  "
            f"({raw.text_encoder_dir})"
        )


def _eval(args):
    import math

    from .pipeline import Kandinsky3

    _check_device(args.device)
    _check_positive(num=args.num, steps=args.steps, world=args.world)
    if args.held_out is not None and args.held_out < 0:
        raise ValueError(f"--held-out must be 0 or more, got {args.held_out}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise ValueError(f"--guidance must be a finite number ≥ 0, got {args.guidance}")
    if args.hr_dir is not None and not Path(args.hr_dir).is_dir():
        raise FileNotFoundError(f"--hr-dir: folder not found: {args.hr_dir}")
    if args.hed_weights is not None and args.what != "edges":
        raise ValueError("--hed-weights is only used by `eval edges`")
    if args.what == "edges":  # no diffusion model: the extractors against the world renderer's true outlines
        from .eval.edges import evaluate_edges, format_table as edges_table

        rows = evaluate_edges(args.num, hed_weights=args.hed_weights)
        print(edges_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps([r if isinstance(r, str) else r.to_dict() for r in rows], indent=2))
        return
    if args.what == "controlnet":  # the ControlNet's hint vs the plain model on unseen scenes (judge-read)
        from .eval.controlnet import control_table, evaluate_control

        pipe = Kandinsky3.from_pretrained(args.model, device=args.device, controlnet=args.controlnet)
        rows = evaluate_control(pipe, args.num, args.steps, args.guidance, baseline=not args.no_baseline)
        print(control_table(rows))
        if args.json:
            data = {row: {name: t.to_dict() for name, t in tallies.items()} for row, tallies in rows.items()}
            Path(args.json).write_text(json.dumps(data, indent=2))
        return
    if args.what in ("ip-adapter", "clipscore"):
        from .eval.ip_adapter import run_clipscore_eval, run_ip_adapter_eval

        (run_ip_adapter_eval if args.what == "ip-adapter" else run_clipscore_eval)(args)
        return
    if args.what == "inpainting":
        from .eval.inpainting import run_inpainting_eval

        run_inpainting_eval(args)
        return
    if args.what == "superres":  # the extras each measure needs fail here, before a model loads
        from .eval import superres  # noqa: F401
    else:
        from .eval import alignment  # noqa: F401
    results = {}
    pipe = None if args.what in ("superres", "flash") else Kandinsky3.from_pretrained(args.model, device=args.device)
    if args.what == "flash":
        from .eval.flash import flash_rows, flash_table

        if args.model is None:
            raise ValueError("eval flash needs --model: the distilled student (e.g. nano-flash)")
        student = Kandinsky3.from_pretrained(args.model, device=args.device)
        teacher = Kandinsky3.from_pretrained(args.teacher, device=args.device)
        rows = flash_rows(student, teacher, args.num, args.steps or student.variant.sampler.steps)
        print(flash_table(rows))
        results = {name: report.to_dict() for name, report in rows.items()}
    elif args.what == "superres":
        from .eval.superres import evaluate_superres, format_table, pairs_from_folder, pairs_from_world
        from .superres import SuperRes

        sr = SuperRes.from_pretrained(args.model, device=args.device)
        if args.hr_dir:
            pairs = pairs_from_folder(args.hr_dir, args.scale, args.num)
        else:
            pairs = pairs_from_world(args.world or 100, args.scale)
        results = evaluate_superres(sr, pairs, args.scale)
        print(format_table(results))
    elif args.what == "movq":
        from .eval.metrics import movq_psnr
        from .world.dataset import to_tensor, world_sample

        images = __import__("torch").stack(
            [to_tensor(world_sample(i, "test", pipe.variant.size).image) for i in range(args.num)]
        )
        results["movq_psnr_db"] = movq_psnr(pipe.movq, images)
        print(f"MoVQ reconstruction PSNR on {args.num} held-out renders: {results['movq_psnr_db']:.2f} dB")
        from .eval.alignment import reconstruction_alignment

        for sigma in (0.0, 0.05):
            report = reconstruction_alignment(pipe.movq, args.num, latent_noise=sigma)
            results[f"roundtrip_alignment_noise_{sigma}"] = report.to_dict()["rates"]
            print(
                f"judge on round trips (latent noise σ={sigma}): "
                + ", ".join(f"{g} {report.rate(g):.1%}" for g in sorted(report.counts))
            )
    else:
        from .eval.alignment import MULTI_OBJECT, evaluate_alignment, paired_comparison

        runs = [args.guidance] + ([] if args.no_baseline else [0.0])
        reports = [
            evaluate_alignment(pipe, args.num, guidance, args.steps, held_out=args.held_out) for guidance in runs
        ]
        for report in reports:
            print(report.table() + "\n")
            results[f"guidance_{report.guidance}"] = report.to_dict()
        if len(reports) == 2:
            only_guided, only_unguided, p = paired_comparison(*reports)
            print(
                f"guidance {reports[0].guidance} vs 0 on the same {', '.join(MULTI_OBJECT)} captions and seeds: "
                f"{only_guided} right only with guidance, {only_unguided} only without (exact McNemar p = {p:.2g})"
            )
            results["paired_multi_object"] = {"only_guided": only_guided, "only_unguided": only_unguided, "p": p}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


#: optional dependencies and the extra that installs them
EXTRAS = {
    "accelerate": "train",
    "yaml": "train",
    "scipy": "eval",
    "torchmetrics": "eval",
    "pycocotools": "eval",
    "bitsandbytes": "quantization",
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
}


def _train(args):
    import math

    _check_positive(steps=args.steps, max_steps=args.max_steps)
    if args.time_budget is not None and not (math.isfinite(args.time_budget) and args.time_budget > 0):
        raise ValueError(f"--time-budget must be a positive number of minutes, got {args.time_budget}")
    from .training import TrainConfig, train
    from .training.recipes import RECIPES

    if args.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {args.recipe!r}; choose one of {', '.join(sorted(RECIPES))}")

    cfg = TrainConfig.from_yaml(
        args.config,
        output_dir=args.output_dir,
        export_dir=args.export_dir,
        steps=args.steps,
        mixed_precision=args.mixed_precision,
        time_budget_minutes=args.time_budget,
    )
    if cfg.recipe != args.recipe:
        raise ValueError(f"{args.config} is a {cfg.recipe!r} config, not {args.recipe!r}")
    summary = train(cfg, max_steps=args.max_steps, progress=not args.no_progress)
    print(json.dumps(summary))


def _caption_regions(args):
    from .training.region_captions import DEFAULT_PROMPT, RegionCaptioner, caption_regions

    _check_positive(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    if not Path(args.root).is_dir():
        raise FileNotFoundError(f"no such folder: {args.root}")
    captioner = RegionCaptioner(args.model, args.prompt or DEFAULT_PROMPT, args.max_new_tokens, args.device)
    path = caption_regions(args.root, captioner, args.annotations, args.manifest, args.margin, args.batch_size)
    print(f"region captions: {path}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, (ValueError, TypeError, RuntimeError)) else text.splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a usage or input error (one line on stderr, nothing written), 130 interrupted."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # refused by the subcommand, whose usage line shows the options it has
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    prefix = f"kandinsky3 {args.command}"

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            if args.command == "convert":
                _convert(args)
            elif args.command == "edges":
                _edges(args)
            elif args.command == "info":
                _info(args)
            elif args.command == "upscale":
                _upscale(args)
            elif args.command == "eval":
                _eval(args)
            elif args.command == "caption-regions":
                _caption_regions(args)
            elif args.command == "train":
                _train(args)
            elif args.command == "serve":
                from .serve import config_from_args, run_server

                return run_server(config_from_args(args))
            elif getattr(args, "prompts", None):
                _generate_batch(args)
            else:
                _generate(args)
        except KeyboardInterrupt:
            print(f"{prefix}: interrupted", file=sys.stderr)
            return 130
        except ModuleNotFoundError as exc:
            extra = EXTRAS.get((exc.name or "").split(".")[0])
            if extra is None:
                raise
            print(
                f"{prefix}: error: {exc.name} is not installed; install the [{extra}] extra: "
                f'pip install -e ".[{extra}]"',
                file=sys.stderr,
            )
            return 2
        except MemoryError:
            print(f"{prefix}: error: out of memory; use a smaller size or fewer images", file=sys.stderr)
            return 2
        except (ValueError, TypeError, OSError, RuntimeError) as exc:
            print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
