"""``kandinsky3 caption-regions``: a caption for every object box of a COCO-style dataset, by a vision-language
model (Kandinsky 3.1 re-captioned its box crops with LLaVA 1.5 so that inpainting keeps long-prompt skill).

Each box is cropped with a context margin (``margin`` × the box's side on every side, clipped to the image),
captioned in batches by any ``transformers`` image-text-to-text model (``AutoModelForImageTextToText``: LLaVA,
BLIP, GIT …; a hub id or a folder), and written as one JSON line per box to ``regions.jsonl`` beside the data:
``{"file", "box", "bbox", "class", "caption"}``. The manifest is appended batch by batch and read first, so an
interrupted run resumes where it stopped. The inpainting recipe reads it (``model.region_manifest``).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from .region_data import read_coco_boxes, read_region_manifest

DEFAULT_PROMPT = "Describe the main object in this image in one short sentence."


def crop_with_margin(image: Image.Image, box, margin: float) -> Image.Image:
    """The box (x0, y0, x1, y1) grown by ``margin`` × its width / height on each side, clipped to the image."""
    x0, y0, x1, y1 = box
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    left, top = max(0, int(x0 - mx)), max(0, int(y0 - my))
    right, bottom = min(image.width, int(round(x1 + mx))), min(image.height, int(round(y1 + my)))
    return image.crop((left, top, max(right, left + 1), max(bottom, top + 1)))


class RegionCaptioner:
    """A transformers vision-language model that captions a list of crops."""

    def __init__(self, model: str, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 40, device: str = "cpu"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model)
        self.model = AutoModelForImageTextToText.from_pretrained(model).to(device).eval()
        self.prompt, self.max_new_tokens, self.device, self.torch = prompt, max_new_tokens, device, torch
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None and not self.model.config.is_encoder_decoder:
            tokenizer.padding_side = "left"  # decoder-only models continue the prompt: pad on the left

    def _text(self) -> str | None:
        template = getattr(self.processor, "chat_template", None)
        if template:  # LLaVA-style chat models: the image token and the question in the model's template
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return self.prompt or None

    def __call__(self, crops: list[Image.Image]) -> list[str]:
        text = self._text()
        kwargs = {"images": crops, "return_tensors": "pt"}
        if text is not None:
            kwargs.update(text=[text] * len(crops), padding=True)
        inputs = self.processor(**kwargs).to(self.device)
        with self.torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if not self.model.config.is_encoder_decoder and "input_ids" in inputs:
            out = out[:, inputs["input_ids"].shape[1] :]  # only the new tokens
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


def caption_regions(
    root: str | Path,
    captioner,
    annotations: str | Path | None = None,
    manifest: str | Path | None = None,
    margin: float = 0.2,
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Caption every box not yet in ``manifest`` (default ROOT/regions.jsonl); ``captioner(crops) → captions``.
    Returns the manifest path."""
    from tqdm.auto import tqdm

    root = Path(root)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if margin < 0:
        raise ValueError(f"margin must be ≥ 0, got {margin}")
    boxes = read_coco_boxes(annotations or root / "annotations.json", root)
    manifest = Path(manifest or root / "regions.jsonl")
    if manifest.is_file():  # a run killed mid-write leaves a partial last line: drop it, redo that box
        text = manifest.read_text()
        if text and not text.endswith("\n"):
            manifest.write_text(text[: text.rfind("\n") + 1])
    done = read_region_manifest(manifest)
    todo = [(f, i, box, name) for f in sorted(boxes) for i, (box, name) in enumerate(boxes[f]) if (f, i) not in done]
    manifest.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="captioning regions", disable=not progress)
    with manifest.open("a") as out:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            crops = []
            for f, _, box, _ in chunk:
                with Image.open(root / f) as im:
                    crops.append(crop_with_margin(im.convert("RGB"), box, margin))
            for (f, i, box, name), caption in zip(chunk, captioner(crops)):
                row = {"file": f, "box": i, "bbox": [round(v, 2) for v in box], "class": name, "caption": caption}
                out.write(json.dumps(row) + "\n")
            out.flush()
            bar.update(len(chunk))
    bar.close()
    return manifest


__all__ = ["DEFAULT_PROMPT", "RegionCaptioner", "caption_regions", "crop_with_margin"]
