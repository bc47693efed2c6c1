"""The Kandinsky 3.1 inpainting eval on the shapes world (issue #17): does the model draw the object asked for?

For each of N held-out scenes (the ``test`` split, never trained on) one object is removed by its box (grown by
1 px, the anti-aliased rim) and regenerated twice from the same start noise:

- from its **region caption** ("a large red circle in the top left"): the world's judge, used as a detector
  (:func:`~kandinsky3.world.judge.detect`: boxes, label = colour + shape, template IoU as the score), reads the
  result; detections centred inside the mask are the regenerated object's candidates, and COCO AP50 against the
  object's true box and label is computed by torchmetrics' ``MeanAveragePrecision`` (pycocotools backend). COCO's
  small/medium/large areas (32², 96² px) mean nothing at 64 px: **AP small / AP large are AP50 over the scenes
  whose removed object is the world's small (radius 0.10 of the side) or large (0.155) size**;
- from a **different object's caption** (another colour absent from the scene and another shape, same size and
  place): the rate at which the detector finds the requested colour + shape inside the mask.

Also the PSNR **outside** the mask against the input, on the raw output (no paste-back), so a model cannot win by
repainting everything. Models: an inpainting model (9-channel U-Net), and the baseline of a text→image model
inpainting by **latent blending** (:class:`LatentBlending`: at every step the known region of its x0 prediction
is replaced by the input's latent, the usual way to inpaint with a model that takes no mask).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from ..diffusion.conditioning import ExtraChannels
from ..pipeline import Kandinsky3
from ..requests import Inpaint
from ..tasks import Plan, plan_inpaint
from ..world.render import OBJECT_RIM, grow_box
from .metrics import psnr

SPLIT = "test"
SEED = 0


@dataclass
class InpaintCase:
    """One scene: the image, the repaint mask, the removed object's box, and the two prompts with their labels."""

    index: int
    image: Image.Image
    mask: np.ndarray  # (H, W) 1 = repaint
    box: tuple[int, int, int, int]
    size: str  # the removed object's size (small / large)
    prompt: str  # the removed object's region caption
    label: str  # "colour shape"
    other_prompt: str  # a different object at the same place
    other_label: str


def region_caption(obj) -> str:
    """The removed object's full description (the renderer's exact caption, every attribute stated)."""
    from ..world.captions import POSITION_PHRASES, SIZE_WORDS

    size = SIZE_WORDS[obj.size][0]
    art = "an" if size[0] in "aeiou" else "a"
    return f"{art} {size} {obj.color} {obj.shape} {POSITION_PHRASES[obj.position][0]}"


def make_cases(num: int, size: int = 64, split: str = SPLIT) -> list[InpaintCase]:
    """N held-out scenes, one object each (chosen by a seeded draw per scene), with both prompts; the eval reports
    the ``test`` split, diagnostics that choose settings use ``val``."""
    from ..world.dataset import world_sample
    from ..world.render import render
    from ..world.scene import COLORS, SHAPES

    cases = []
    for i in range(num):
        s = world_sample(i, split, size)
        rng = random.Random(10_007 + i)
        k = rng.randrange(len(s.scene.objects))
        obj = s.scene.objects[k]
        x0, y0, x1, y1 = grow_box(render(s.scene, size).boxes[k], OBJECT_RIM, size, size)
        mask = np.zeros((size, size), np.float32)
        mask[y0:y1, x0:x1] = 1.0
        used = {o.color for o in s.scene.objects} | {s.scene.background}
        color = rng.choice([c for c in COLORS if c not in used])
        shape = rng.choice([sh for sh in SHAPES if sh != obj.shape])
        other = replace(obj, color=color, shape=shape)
        cases.append(
            InpaintCase(
                i,
                s.image,
                mask,
                render(s.scene, size).boxes[k],
                obj.size,
                region_caption(obj),
                f"{obj.color} {obj.shape}",
                region_caption(other),
                f"{color} {shape}",
            )
        )
    return cases


class LatentBlending(torch.nn.Module):
    """A text→image U-Net made to inpaint: it takes the inpainting channels ``[keep-mask, masked latent]`` like a
    9-channel U-Net, ignores them as inputs, and replaces the known region of its x0 prediction by ``known``
    (the input image's latent) at every step — ε is rewritten so that the sampler's x0 is the blended one.

    Set ``known`` (B, C, h, w) before each run; a guided batch (2B rows) uses it for both halves."""

    def __init__(self, unet: torch.nn.Module, schedule):
        super().__init__()
        self.unet, self.schedule = unet, schedule
        self.known: torch.Tensor | None = None

    @property
    def config(self):
        return self.unet.config

    @property
    def in_channels(self) -> int:
        return self.unet.in_channels

    def forward(
        self,
        x,
        time,
        context=None,
        context_mask=None,
        control_residuals=None,
        context_lengths=None,
        extra_channels=None,
    ):
        eps = self.unet(x, time, context, context_mask, control_residuals, context_lengths)
        if extra_channels is None or self.known is None:
            return eps
        keep = extra_channels[:, :1].to(eps.dtype)
        known = self.known.to(eps.device, eps.dtype)
        if known.shape[0] != x.shape[0]:
            known = known.repeat(x.shape[0] // known.shape[0], 1, 1, 1)
        abar = self.schedule.abar_per_sample(time.to(eps.device)).to(eps.dtype).view(-1, 1, 1, 1)
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        x0 = keep * known + (1 - keep) * x0
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


def blending_pipeline(base: Kandinsky3) -> Kandinsky3:
    """``base`` (a text→image model) as an inpainting pipeline by latent blending (:class:`LatentBlending`)."""
    from ..checkpoints.loading import Components

    variant = replace(base.variant, name=f"{base.variant.name} (latent blending)", inpainting=True)
    unet = LatentBlending(base.unet, base.schedule)
    return Kandinsky3(Components(variant, unet, base.movq, base.text_encoder), device=base.device)


def inpaint_cases(
    pipe: Kandinsky3,
    cases: list[InpaintCase],
    prompts: list[str],
    steps=None,
    guidance=None,
    batch: int = 64,
    progress: bool = True,
    callback=None,
) -> list[Image.Image]:
    """One output per case (``prompts[i]`` for ``cases[i]``), many scenes per sampler run: each scene's plan is
    built by the inpaint task's own builder, and the plans' inputs are stacked into one batch. ``callback(step, t,
    x)`` sees every sampler step of every batch (the last one's ``x`` is the batch's final latent)."""
    from tqdm.auto import tqdm

    blending = isinstance(pipe.unet, LatentBlending)
    out = []
    starts = range(0, len(cases), batch)
    for start in tqdm(starts, desc=f"inpainting ({pipe.variant.name})", disable=not progress, leave=False):
        chunk, texts = cases[start : start + batch], prompts[start : start + batch]
        plans = [
            plan_inpaint(pipe, Inpaint(image=c.image, mask=c.mask, prompt=p, steps=steps, guidance=guidance, seed=SEED))
            for c, p in zip(chunk, texts)
        ]
        first = plans[0]
        merged = Plan(
            first.task,
            [p.prompts[0] for p in plans],
            None,
            replace(first.settings, seed=[SEED + c.index for c in chunk]),
            (len(plans), *first.shape[1:]),
            adapters=[ExtraChannels(torch.cat([p.adapters[0].channels for p in plans]))],
        )
        if blending:
            with torch.no_grad():
                pipe.unet.known = torch.cat([pipe.encode_image(c.image) for c in chunk])
        out += pipe._execute(merged, None, callback, False)
    return out


@dataclass
class InpaintReport:
    model: str
    num: int
    ap50: float
    ap_small: float
    ap_large: float
    found: float  # share of scenes where the requested (original) object is detected inside the mask
    different: float  # share where the requested different object is detected inside the mask
    psnr_outside: float  # dB, mean over images (both prompts)
    steps: int | None = None
    guidance: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


LABELS: list[str] = []


def _label_id(label: str) -> int:
    from ..world.scene import COLORS, SHAPES

    if not LABELS:
        LABELS.extend(f"{c} {s}" for c in COLORS for s in SHAPES)
    return LABELS.index(label)


def detections_in_mask(image: Image.Image, mask: np.ndarray):
    """The judge's detections whose box centre lies inside the repaint mask (the regenerated object's candidates)."""
    from ..world.judge import detect

    found = []
    for d in detect(image):
        cx, cy = (d.box[0] + d.box[2]) // 2, (d.box[1] + d.box[3]) // 2
        if mask[min(cy, mask.shape[0] - 1), min(cx, mask.shape[1] - 1)] > 0.5:
            found.append(d)
    return found


def average_precision_50(items) -> float:
    """COCO AP at IoU 0.5 of ``(detections, true box, true label)`` items (one image each), computed by
    pycocotools' ``COCOeval`` (the reference implementation; torchmetrics' ``MeanAveragePrecision`` wraps the same
    code but needs torchvision); NaN without items. Every label is a category, one true object per image."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    items = list(items)
    if not items:
        return float("nan")
    _label_id("red circle")
    images, annotations, results = [], [], []
    for i, (dets, box, label) in enumerate(items):
        x0, y0, x1, y1 = (float(v) for v in box)
        images.append({"id": i, "width": 64, "height": 64})
        annotations.append(
            {
                "id": i + 1,
                "image_id": i,
                "category_id": _label_id(label),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
            }
        )
        for d in dets:
            a0, b0, a1, b1 = (float(v) for v in d.box)
            results.append(
                {"image_id": i, "category_id": _label_id(d.label), "bbox": [a0, b0, a1 - a0, b1 - b0], "score": d.score}
            )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": k, "name": n} for k, n in enumerate(LABELS)],
        }
        truth.createIndex()
        if not results:
            return 0.0
        found = truth.loadRes(results)
        ev = COCOeval(truth, found, "bbox")
        ev.params.iouThrs = np.array([0.5])
        ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
        ev.params.maxDets = [100]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][0, :, :, 0, 0]  # (recall thresholds, categories)
    present = sorted({_label_id(label) for _, _, label in items})
    per_class = [precision[:, k][precision[:, k] > -1] for k in present]
    return float(np.mean([p.mean() if len(p) else 0.0 for p in per_class]))


def psnr_outside(output: Image.Image, image: Image.Image, mask: np.ndarray) -> float:
    keep = mask < 0.5
    a = np.asarray(output.convert("RGB"), np.float64)[keep] / 255.0
    b = np.asarray(image.convert("RGB"), np.float64)[keep] / 255.0
    return psnr(a, b)


def score(name: str, cases: list[InpaintCase], same: list[Image.Image], other: list[Image.Image]) -> InpaintReport:
    """The report of one model's outputs: ``same[i]`` from case i's caption, ``other[i]`` from its other object's."""
    items = [(detections_in_mask(o, c.mask), c.box, c.label) for c, o in zip(cases, same)]
    small = [it for it, c in zip(items, cases) if c.size == "small"]
    large = [it for it, c in zip(items, cases) if c.size == "large"]
    found = np.mean([any(d.label == c.label for d in it[0]) for it, c in zip(items, cases)])
    diff = np.mean([any(d.label == c.other_label for d in detections_in_mask(o, c.mask)) for c, o in zip(cases, other)])
    psnrs = [psnr_outside(o, c.image, c.mask) for c, o in zip(cases + cases, same + other)]
    return InpaintReport(
        name,
        len(cases),
        average_precision_50(items),
        average_precision_50(small),
        average_precision_50(large),
        float(found),
        float(diff),
        float(np.mean(psnrs)),
    )


def evaluate_inpainting(
    pipe: Kandinsky3, cases: list[InpaintCase], steps=None, guidance=None, name=None, progress: bool = True
) -> tuple[InpaintReport, list[Image.Image], list[Image.Image]]:
    same = inpaint_cases(pipe, cases, [c.prompt for c in cases], steps, guidance, progress=progress)
    other = inpaint_cases(pipe, cases, [c.other_prompt for c in cases], steps, guidance, progress=progress)
    report = score(name or pipe.variant.name, cases, same, other)
    s = pipe.variant.sampler
    report.steps, report.guidance = steps or s.steps, s.guidance if guidance is None else guidance
    return report, same, other


SEED_ROWS = [  # the seed's table (issue #17): 1000 COCO val images, YOLO-X on the results — a different dataset
    ("SD (COCO, seed)", 0.276, 0.033, 0.253),
    ("SDXL (COCO, seed)", 0.272, 0.032, 0.245),
    ("SD2 (COCO, seed)", 0.238, 0.032, 0.205),
    ("Kandinsky 3.0 (COCO, seed)", 0.290, 0.028, 0.275),
    ("Kandinsky 3.1 (COCO, seed)", 0.306, 0.027, 0.296),
]


def format_table(reports: list[InpaintReport], seed_rows: bool = True) -> str:
    head = f"{'model':<44}{'AP50':>7}{'AP small':>10}{'AP large':>10}{'found':>8}{'other obj':>11}{'PSNR out':>10}"
    lines = [head]
    for r in reports:
        lines.append(
            f"{r.model:<44}{r.ap50:>7.3f}{r.ap_small:>10.3f}{r.ap_large:>10.3f}{r.found:>8.1%}{r.different:>11.1%}"
            f"{r.psnr_outside:>9.1f} dB"
        )
    if seed_rows:
        lines.append("— the seed's numbers: COCO photos, YOLO-X detector (a different dataset, not comparable) —")
        lines += [f"{n:<44}{a:>7.3f}{s:>10.3f}{lg:>10.3f}{'—':>8}{'—':>11}{'—':>10}" for n, a, s, lg in SEED_ROWS]
    return "\n".join(lines)


def picture_grid(cases: list[InpaintCase], outputs: dict[str, list[list[Image.Image]]], scale: int = 2) -> Image.Image:
    """Rows = cases; columns: input, mask, then each named output list (one image per case)."""
    columns = [
        [c.image for c in cases],
        [Image.fromarray((c.mask * 255).astype(np.uint8)).convert("RGB") for c in cases],
    ]
    for images in outputs.values():
        columns.append(images)
    w, h = cases[0].image.size
    grid = Image.new("RGB", (w * len(columns), h * len(cases)), "white")
    for x, col in enumerate(columns):
        for y, im in enumerate(col):
            grid.paste(im, (x * w, y * h))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


__all__ = [
    "InpaintCase",
    "InpaintReport",
    "LatentBlending",
    "average_precision_50",
    "blending_pipeline",
    "detections_in_mask",
    "evaluate_inpainting",
    "format_table",
    "inpaint_cases",
    "make_cases",
    "picture_grid",
    "psnr_outside",
    "region_caption",
    "score",
]


def run_inpainting_eval(args):
    """``kandinsky3 eval inpainting``: the model, the models to compare and the latent-blending baseline on the
    same scenes; prints the table (with the seed's rows), writes ``--json`` and ``--grid``."""
    import json
    import time
    from pathlib import Path

    models = [(args.model or "nano-inpainting", False)] + [(m, False) for m in args.compare]
    if args.baseline and args.baseline.lower() != "none":
        models.append((args.baseline, True))
    cases = make_cases(args.num)
    reports, grid = [], {}
    for name, blend in models:
        start = time.perf_counter()
        pipe = Kandinsky3.from_pretrained(name, device=args.device)
        if blend:
            pipe = blending_pipeline(pipe)
        label = pipe.variant.name if name in (pipe.variant.name,) or blend else f"{pipe.variant.name} ({name})"
        report, same, other = evaluate_inpainting(pipe, cases, args.steps, args.guidance, label)
        report.extra["seconds"] = round(time.perf_counter() - start, 1)
        reports.append(report)
        grid[f"{label}: caption"] = same[:8]
        grid[f"{label}: other object"] = other[:8]
        print(format_table([report], seed_rows=False).splitlines()[1], f"({report.extra['seconds']} s)", flush=True)
    print(format_table(reports))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in reports], indent=2))
    if args.grid:
        picture_grid(cases[:8], grid).save(args.grid)
