"""Conversions keep the model (#20): nano and tiny through every layout (native → official → diffusers → native →
diffusers → official → native: each of the six directions once) load back with the same configs and sampler
defaults and draw the same pictures; official files carry no config, so our side file beside them is what keeps a
model that is not a released preset."""

from __future__ import annotations

import numpy as np
import pytest

from kandinsky3 import Kandinsky3
from kandinsky3.checkpoints import convert, read
from kandinsky3.checkpoints.layouts import official_sidecar
from kandinsky3.registry import NANO_DIR

CHAIN = [("official", "o1"), ("diffusers", "d1"), ("native", "n1"), ("diffusers", "d2"), ("official", "o2")]
CHAIN += [("native", "n2")]


def _load_and_draw(folder, **size):
    pipe = Kandinsky3.from_pretrained(str(folder), device="cpu")
    [image] = pipe.generate("a red circle in the top left", seed=0, steps=2, progress=False, **size)
    return pipe.variant, np.asarray(image)


def _same_raw(a, b) -> bool:
    same = lambda x, y: x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)  # noqa: E731
    return (
        a.variant == b.variant
        and same(a.unet, b.unet)
        and same(a.movq, b.movq)
        and same(a.projection, b.projection)
        and (a.null_embedding is None) == (b.null_embedding is None)
        and (a.null_embedding is None or a.null_embedding.equal(b.null_embedding))
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nano", "tiny"])
def test_every_layout_gives_the_same_model_and_pictures(name, tiny, tmp_path):
    """The first lap loads and draws with each layout; the second lap's files must read back tensor for tensor
    (and config for config) equal to the first's, which is stronger than pictures and needs no model."""
    src = NANO_DIR if name == "nano" else tmp_path / "native"
    if name == "tiny":
        tiny.save_pretrained(src, layout="native")
    variant, picture = _load_and_draw(src)
    assert variant.name == name
    previous = src
    for layout, folder in CHAIN:
        convert(previous, tmp_path / folder, layout)
        previous = tmp_path / folder
        if folder.endswith("1"):
            got, drawn = _load_and_draw(tmp_path / folder)
            assert (got.name, got.unet, got.movq, got.sampler, got.size) == (
                variant.name,
                variant.unet,
                variant.movq,
                variant.sampler,
                variant.size,
            ), layout
            assert np.array_equal(drawn, picture), layout
        else:
            first = read(tmp_path / (folder[0] + "1"))
            assert _same_raw(read(tmp_path / folder), first), layout


def test_official_files_without_the_side_file_still_load_by_their_shapes(tiny, tmp_path):
    """Released official folders have no side file: configs are inferred from the shapes (tiny is official-shaped),
    sampler defaults are the named variant's."""
    tiny.save_pretrained(tmp_path / "o", layout="official")
    sidecar = official_sidecar(tmp_path / "o" / "weights" / "kandinsky3.pt")
    assert sidecar.is_file()
    with_side, picture = _load_and_draw(tmp_path / "o")
    sidecar.unlink()
    without, drawn = _load_and_draw(tmp_path / "o", width=64, height=64)
    assert with_side.name == "tiny" and without.name == "base-custom" and without.size == 1024
    assert without.unet == tiny.variant.unet and np.array_equal(drawn, picture)


def test_a_nano_diffusers_folder_keeps_diffusers_key_names(tmp_path):
    """nano's U-Net (cross-attention at every level) is not a config diffusers can express; its folder still has
    diffusers' files and key names, and the side file holds the exact config."""
    import json

    from safetensors import safe_open

    convert(NANO_DIR, tmp_path / "d", "diffusers")
    with safe_open(str(tmp_path / "d" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "conv_in.weight" in keys and "encoder_hid_proj.projection_linear.weight" in keys
    side = json.loads((tmp_path / "d" / "kandinsky3_defaults.json").read_text())
    assert side["unet"]["add_cross_attention"] == [True, True, True] and side["sampler"]["guidance"] == 1.0
