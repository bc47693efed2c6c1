"""`kandinsky3 caption-regions` on a tiny random VLM made here: it runs, batches, resumes, writes the manifest."""

import json

import pytest
import torch
from PIL import Image

from kandinsky3 import cli
from kandinsky3.training.region_captions import RegionCaptioner, caption_regions, crop_with_margin

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "cat", "on"]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A random 1-layer BLIP captioner with a 12-word tokenizer, saved as a transformers folder."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    try:
        from transformers import BlipImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import BlipImageProcessor as ImageProcessor

    d = tmp_path_factory.mktemp("vlm")
    (d / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(d / "vocab.txt"))
    processor = BlipProcessor(image_processor=ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    text = dict(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=2,
        sep_token_id=3,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(d / "model")
    processor.save_pretrained(d / "model")
    return d / "model"


@pytest.fixture
def data(tmp_path):
    images, annotations = [], []
    for i, (w, h) in enumerate([(48, 32), (40, 40), (32, 48)]):
        Image.new("RGB", (w, h), (40 * i, 100, 200)).save(tmp_path / f"im{i}.png")
        images.append({"id": i, "file_name": f"im{i}.png", "width": w, "height": h})
        for k in range(2):
            annotations.append({"id": 10 * i + k, "image_id": i, "bbox": [2 + 10 * k, 3, 8, 9], "category_id": 1})
    ann = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "annotations.json").write_text(json.dumps(ann))
    return tmp_path


def test_crop_keeps_a_context_margin_clipped_to_the_image():
    im = Image.new("RGB", (50, 40))
    assert crop_with_margin(im, (10, 10, 20, 30), 0.5).size == (20, 40)  # 5 px / 10 px each side
    assert crop_with_margin(im, (10, 10, 20, 20), 0.2).size == (14, 14)
    assert crop_with_margin(im, (0, 0, 10, 10), 0.5).size == (15, 15)  # clipped at the top left


def test_tiny_vlm_captions_batches_resumes_and_writes_the_manifest(tiny_vlm, data):
    captioner = RegionCaptioner(str(tiny_vlm), prompt="", max_new_tokens=4)
    batches = []

    def counting(crops):
        batches.append(len(crops))
        if len(batches) == 2:
            raise KeyboardInterrupt  # killed during the second batch
        return captioner(crops)

    with pytest.raises(KeyboardInterrupt):
        caption_regions(data, counting, batch_size=4, progress=False)
    rows = [json.loads(line) for line in (data / "regions.jsonl").read_text().splitlines()]
    assert batches == [4, 2] and len(rows) == 4
    # a partial last line (killed mid-write) is dropped and that box redone
    with (data / "regions.jsonl").open("a") as f:
        f.write('{"file": "im2.png", "bo')
    batches.clear()
    caption_regions(data, lambda crops: batches.append(len(crops)) or captioner(crops), batch_size=4, progress=False)
    assert batches == [2]  # only the two boxes not yet captioned
    rows = [json.loads(line) for line in (data / "regions.jsonl").read_text().splitlines()]
    assert sorted((r["file"], r["box"]) for r in rows) == [(f"im{i}.png", k) for i in range(3) for k in range(2)]
    assert all(isinstance(r["caption"], str) and r["class"] == "thing" for r in rows)
    assert set(" ".join(r["caption"] for r in rows).split()) <= set(WORDS)
    # a complete manifest: nothing left to do
    batches.clear()
    caption_regions(data, lambda crops: batches.append(len(crops)) or captioner(crops), progress=False)
    assert batches == []


def test_cli_caption_regions(tiny_vlm, data, capsys):
    rc = cli.main(
        [
            "caption-regions",
            str(data),
            "--model",
            str(tiny_vlm),
            "--batch-size",
            "3",
            "--prompt",
            "a",
            "--max-new-tokens",
            "3",
        ]
    )
    assert rc in (0, None)
    assert len((data / "regions.jsonl").read_text().splitlines()) == 6
    assert "regions.jsonl" in capsys.readouterr().out


def test_cli_caption_regions_bad_input(tmp_path, capsys):
    assert cli.main(["caption-regions", str(tmp_path / "nope"), "--model", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err
