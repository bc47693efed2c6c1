"""Full-size presets built on the meta device: exact official tensor names, shapes and parameter counts."""

import pytest
import torch

from kandinsky3.checkpoints import keymaps
from kandinsky3.models import MoVQ, UNet
from kandinsky3.registry import VARIANTS


def _meta(cls, config):
    with torch.device("meta"):
        return cls(config)


def _count(sd):
    return sum(t.numel() for t in sd.values())


@pytest.mark.parametrize(
    "name,params", [("base", 3_038_562_820), ("flash", 3_038_562_820), ("inpainting", 3_038_571_460)]
)
def test_unet_presets(name, params):
    sd = _meta(UNet, VARIANTS[name].unet).state_dict()
    assert len(sd) == 1068
    assert _count(sd) == params


def test_unet_key_examples_from_the_spec():
    sd = _meta(UNet, VARIANTS["base"].unet).state_dict()
    expected = {
        "down_samples.0.resnet_attn_blocks.2.2.resnet_blocks.0.projection.weight": (192, 384, 1, 1),
        "down_samples.0.resnet_attn_blocks.2.2.shortcut_down_sample.weight": (384, 384, 2, 2),
        "down_samples.1.resnet_attn_blocks.0.1.attention.to_key.weight": (768, 4096),
        "up_samples.1.resnet_attn_blocks.0.0.resnet_blocks.0.group_norm.context_mlp.1.weight": (6144, 1536),
        "up_samples.1.resnet_attn_blocks.0.0.resnet_blocks.1.up_sample.weight": (1536, 1536, 2, 2),
        "up_samples.1.resnet_attn_blocks.0.0.shortcut_up_sample.weight": (3072, 3072, 2, 2),
        "to_time_embed.1.weight": (1536, 192),
        "feature_pooling.attention.to_query.weight": (1536, 4096),
        "in_layer.weight": (192, 4, 3, 3),
        "out_layer.2.weight": (4, 192, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("down_samples.0.self_attention_block") for k in sd)
    assert not any(k.startswith("up_samples.3.self_attention_block") for k in sd)


def test_unet_keys_map_onto_diffusers_exactly():
    diffusers = pytest.importorskip("diffusers")
    sd = _meta(UNet, VARIANTS["base"].unet).state_dict()
    projection = {
        "0.weight": torch.empty(4096, 4096, device="meta"),
        "1.weight": torch.empty(4096, device="meta"),
        "1.bias": torch.empty(4096, device="meta"),
    }
    converted = keymaps.unet_to_diffusers(sd, projection)
    with torch.device("meta"):
        ref = diffusers.Kandinsky3UNet().state_dict()
    assert len(converted) == len(ref) == 1071
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert _count(converted) == 3_055_348_228


def test_movq_preset():
    sd = _meta(MoVQ, VARIANTS["base"].movq).state_dict()
    assert len(sd) == 430
    assert _count(sd) == 270_603_567
    assert not any(k.startswith("quantize") for k in sd)
    assert tuple(sd["decoder.conv_in.weight"].shape) == (1024, 4, 3, 3)
    assert tuple(sd["decoder.up.3.attn.2.q.weight"].shape) == (1024, 1024, 1, 1)


def test_movq_keys_map_onto_diffusers_exactly():
    diffusers = pytest.importorskip("diffusers")
    config = VARIANTS["base"].movq
    sd = _meta(MoVQ, config).state_dict()
    converted = keymaps.movq_to_diffusers(sd)
    cfg = {k: v for k, v in keymaps.movq_config_to_diffusers(config).items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = diffusers.VQModel(**cfg).state_dict()
    assert len(ref) == 431
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ref.items()}
