"""IP-Adapter model and files (spec §8.2, §12.3): released names and sizes, the zero-init property, parity of the
decoupled cross-attention with the spec's formula written out here, native / released layouts and round trips."""

import json
import math

import pytest
import torch

from kandinsky3.checkpoints.io import CheckpointError, load_file
from kandinsky3.checkpoints.ip_adapter import (
    FORK_UNET_FILES,
    RawIPAdapter,
    build_ip_adapter,
    convert_ip_adapter,
    read_ip_adapter,
    write_fork_ip,
)
from kandinsky3.checkpoints.loading import tiny_components
from kandinsky3.models.ip_adapter import IPAdapter, IPAdapterConfig, cross_attention_layers
from kandinsky3.models.unet import UNet, UNetConfig
from kandinsky3.registry import VARIANTS

# spec §8.2: the 18 text cross-attention layers of the released U-Net and their widths
RELEASED_LAYERS = {
    **{
        f"down_samples.{lvl}.resnet_attn_blocks.{i}.1.attention": w
        for lvl, w in ((1, 768), (2, 1536), (3, 3072))
        for i in range(3)
    },
    **{f"up_samples.0.resnet_attn_blocks.{i}.1.attention": 3072 for i in range(3)},
    **{f"up_samples.1.resnet_attn_blocks.{i}.1.attention": w for i, w in enumerate((3072, 1536, 1536))},
    **{f"up_samples.2.resnet_attn_blocks.{i}.1.attention": w for i, w in enumerate((1536, 768, 768))},
}


def released_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {
        "image_proj.weight": (16384, 768),
        "image_proj.bias": (16384,),
        "image_norm.weight": (4096,),
        "image_norm.bias": (4096,),
    }
    for layer, c in RELEASED_LAYERS.items():
        p = f"{layer}.processor"
        shapes |= {
            f"{p}.to_key_ip.weight": (c, 4096),
            f"{p}.to_key_ip.bias": (c,),
            f"{p}.to_v_ip.weight": (c, 4096),
            f"{p}.to_v_ip.bias": (c,),
            f"{p}.to_out_ip.weight": (c, c),
            f"{p}.to_out_ip.bias": (c,),
        }
    return shapes


def test_full_size_adapter_has_the_released_tensors_and_parameter_count():
    with torch.device("meta"):
        adapter = IPAdapter(IPAdapterConfig())
    assert len(RELEASED_LAYERS) == 18
    assert dict(cross_attention_layers(UNetConfig())) == RELEASED_LAYERS
    sd = adapter.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == released_shapes()
    assert sum(p.numel() for p in adapter.parameters()) == 378_991_872
    # (3,055,348,228 + 378,991,872) × 4 bytes ≈ 13.7 GB, the released unet file (spec §8.2)
    assert math.isclose((3_055_348_228 + 378_991_872) * 4 / 1e9, 13.7, abs_tol=0.05)


def test_a_fork_layout_state_dict_loads_strictly_on_meta():
    fork = {k: torch.empty(s, device="meta") for k, s in released_shapes().items()}
    with torch.device("meta"):
        adapter = IPAdapter(IPAdapterConfig())
    adapter.load_state_dict(fork, strict=True, assign=True)
    with torch.device("meta"):
        unet = UNet(UNetConfig())
    adapter.attach(unet)
    assert unet.get_submodule("up_samples.2.resnet_attn_blocks.2.1.attention").ip is adapter.layer(
        "up_samples.2.resnet_attn_blocks.2.1.attention"
    )
    # the U-Net's own state dict is untouched: the official 1068 tensors, no processor keys
    assert len(unet.state_dict()) == 1068 and not any(".processor." in k for k in unet.state_dict())


def test_to_out_ip_is_zero_initialised():
    torch.manual_seed(0)
    adapter = IPAdapter(IPAdapterConfig(image_embed_dim=16, unet=VARIANTS["tiny"].unet))
    for _, layer in adapter.layers():
        assert not layer.to_out_ip.weight.any() and not layer.to_out_ip.bias.any()
        assert layer.to_key_ip.weight.any()


@torch.no_grad()
def test_init_from_the_text_path_copies_keys_and_values_and_keeps_the_output(tiny):
    unet, x, t, context, mask = tiny
    plain = unet(x, t, context, mask)
    adapter = IPAdapter(IPAdapterConfig(image_embed_dim=16, unet=unet.config)).init_from_text_path(unet)
    for name, layer in adapter.layers():
        attention = unet.get_submodule(name)
        assert torch.equal(layer.to_key_ip.weight, attention.to_key.weight)
        assert torch.equal(layer.to_v_ip.weight, attention.to_value.weight)
        assert not layer.to_key_ip.bias.any() and not layer.to_v_ip.bias.any()
        assert layer.to_key_ip.weight.data_ptr() != attention.to_key.weight.data_ptr()  # a copy, not a share
    adapter.attach(unet)
    try:
        assert torch.equal(unet(x, t, context, mask, image_tokens=tokens_for(adapter)), plain)  # to_out_ip still 0
    finally:
        IPAdapter.detach(unet)


@pytest.fixture(scope="module")
def tiny():
    components = tiny_components()
    unet = components.unet.eval()
    g = torch.Generator().manual_seed(1)
    b = 2
    x = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.tensor([500.0, 20.0])
    context = torch.randn(b, 5, unet.config.context_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return unet, x, t, context, mask


def random_adapter(unet, seed=0, zero_out=False):
    g = torch.Generator().manual_seed(seed)
    adapter = IPAdapter(IPAdapterConfig(image_embed_dim=16, unet=unet.config))
    for name, p in adapter.named_parameters():
        if zero_out and ".to_out_ip." in name:
            continue
        p.data = torch.randn(p.shape, generator=g) * 0.1
    return adapter.eval()


def tokens_for(adapter, b=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return adapter.image_tokens(torch.randn(b, 16, generator=g))


@torch.no_grad()
def test_zero_initialised_adapter_and_zero_weight_equal_the_plain_unet_exactly(tiny):
    unet, x, t, context, mask = tiny
    plain = unet(x, t, context, mask)
    zero = random_adapter(unet, zero_out=True).attach(unet)
    try:
        assert torch.equal(unet(x, t, context, mask, image_tokens=tokens_for(zero)), plain)
        full = random_adapter(unet, seed=5).attach(unet)
        tokens = tokens_for(full)
        assert torch.equal(unet(x, t, context, mask, image_tokens=tokens, image_weight=0.0), plain)
        assert torch.equal(unet(x, t, context, mask, image_tokens=tokens, image_weight=torch.zeros(2)), plain)
        assert not torch.allclose(unet(x, t, context, mask, image_tokens=tokens), plain)  # the image path is live
        assert torch.equal(unet(x, t, context, mask), plain)  # attached, but no tokens: the plain path
    finally:
        IPAdapter.detach(unet)


def reference_image_term(attention, layer, x, tokens, weight):
    """Spec §8.2 written out: softmax(q·k_ipᵀ·d^−½)·v_ip per head (same query and heads as the text attention, no
    mask), heads merged, then to_out_ip, times the image weight."""
    b, n, _ = x.shape
    heads = attention.num_heads
    d = attention.to_query.out_features // heads
    q = (x @ attention.to_query.weight.T).view(b, n, heads, d).permute(0, 2, 1, 3)
    k = (tokens @ layer.to_key_ip.weight.T + layer.to_key_ip.bias).view(b, -1, heads, d).permute(0, 2, 1, 3)
    v = (tokens @ layer.to_v_ip.weight.T + layer.to_v_ip.bias).view(b, -1, heads, d).permute(0, 2, 1, 3)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ v).permute(0, 2, 1, 3).reshape(b, n, heads * d)
    return weight.view(-1, 1, 1) * (out @ layer.to_out_ip.weight.T + layer.to_out_ip.bias)


@torch.no_grad()
def test_decoupled_attention_matches_the_spec_formula_in_the_whole_unet(tiny):
    unet, x, t, context, mask = tiny
    adapter = random_adapter(unet, seed=7)
    tokens = tokens_for(adapter)
    weight = torch.tensor([0.7, 1.3])
    # reference: the plain U-Net, with each text cross-attention's output increased by the formula above
    hooks = []
    for name, layer in adapter.layers():
        attention = unet.get_submodule(name)

        def hook(module, args, output, layer=layer):
            return output + reference_image_term(module, layer, args[0], tokens, weight)

        hooks.append(attention.register_forward_hook(hook))
    try:
        reference = unet(x, t, context, mask)
    finally:
        for h in hooks:
            h.remove()
    adapter.attach(unet)
    try:
        ours = unet(x, t, context, mask, image_tokens=tokens, image_weight=weight)
    finally:
        IPAdapter.detach(unet)
    assert (ours - reference).abs().max() <= 1e-5
    assert (ours - unet(x, t, context, mask)).abs().max() > 1e-3


def test_image_tokens_are_the_normalised_projection():
    torch.manual_seed(0)
    adapter = IPAdapter(IPAdapterConfig(image_embed_dim=16, unet=VARIANTS["tiny"].unet))
    e = torch.randn(3, 16)
    tokens = adapter.image_tokens(e)
    ctx = VARIANTS["tiny"].unet.context_dim
    expected = torch.nn.functional.layer_norm(
        (e @ adapter.image_proj.weight.T + adapter.image_proj.bias).view(3, 4, ctx),
        (ctx,),
        adapter.image_norm.weight,
        adapter.image_norm.bias,
    )
    assert tokens.shape == (3, 4, ctx) and torch.allclose(tokens, expected, atol=1e-6)


def test_image_tokens_without_an_attached_adapter_is_a_clear_error(tiny):
    unet, x, t, context, mask = tiny
    with pytest.raises(RuntimeError, match="no IP-Adapter is attached"):
        unet(x, t, context, mask, image_tokens=torch.zeros(2, 4, unet.config.context_dim))


def test_an_adapter_for_another_unet_size_is_refused(tiny):
    unet = tiny[0]
    other = IPAdapter(IPAdapterConfig(image_embed_dim=16, unet=VARIANTS["nano"].unet))
    with pytest.raises(ValueError, match="made for another U-Net"):
        other.attach(unet)
    raw = RawIPAdapter(other.config, other.state_dict(), "nano-sized")
    with pytest.raises(CheckpointError, match="another U-Net size"):
        build_ip_adapter(raw, unet.config)


# ---------------------------------------------------------------------------------------------------------------
# files


def fork_folder(root, unet, adapter):
    """A released-layout folder of a tiny U-Net: official U-Net keys + projection_lin/ln + adapter keys in one file."""
    text = tiny_components().text_encoder
    projection = text.projection.state_dict()
    raw = RawIPAdapter(
        adapter.config,
        {k: v.clone() for k, v in adapter.state_dict().items()},
        "tiny-ip",
        unet={k: v.clone() for k, v in unet.state_dict().items()},
        projection={k: v.clone() for k, v in projection.items()},
    )
    write_fork_ip(raw, root)
    return raw


def test_released_layout_splits_keys_and_round_trips_bit_identically(tiny, tmp_path):
    unet = tiny[0]
    adapter = random_adapter(unet, seed=11)
    fork_folder(tmp_path / "fork", unet, adapter)
    blob = load_file(tmp_path / "fork" / FORK_UNET_FILES[0])
    assert "projection_lin.weight" in blob and "image_proj.weight" in blob
    assert any(".attention.processor.to_key_ip." in k for k in blob)

    raw = read_ip_adapter(tmp_path / "fork")
    assert raw.config.unet == unet.config and raw.text == "zeros"
    assert set(raw.unet) == set(unet.state_dict()) and set(raw.projection) == {"0.weight", "1.weight", "1.bias"}
    built = build_ip_adapter(raw, unet.config)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), adapter.state_dict().values()))

    convert_ip_adapter(tmp_path / "fork", tmp_path / "native", "native")
    assert (tmp_path / "native" / "ip_adapter.safetensors").is_file()
    native = load_file(tmp_path / "native" / "ip_adapter.safetensors")
    assert set(native) == set(adapter.state_dict())
    convert_ip_adapter(tmp_path / "native", tmp_path / "back", "fork")
    again = load_file(tmp_path / "back" / FORK_UNET_FILES[0])
    assert set(again) == set(blob)
    assert all(torch.equal(again[k], blob[k]) and again[k].dtype == blob[k].dtype for k in blob)
    # the released layout has no place for an adapter's own sampling settings: converting says so
    meta = json.loads((tmp_path / "native" / "ip_adapter.json").read_text())
    meta["sampling"] = {"early_boost": 3.0, "early_fraction": 0.4}
    (tmp_path / "native" / "ip_adapter.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no place for the adapter's own sampling settings"):
        convert_ip_adapter(tmp_path / "native", tmp_path / "again", "fork")


def test_adapter_only_folder_cannot_be_written_in_the_released_layout(tiny, tmp_path):
    adapter = random_adapter(tiny[0])
    raw = RawIPAdapter(adapter.config, adapter.state_dict(), "only")
    with pytest.raises(CheckpointError, match="stores the U-Net with the adapter"):
        write_fork_ip(raw, tmp_path)


def test_a_folder_without_an_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="holds no IP-Adapter"):
        read_ip_adapter(tmp_path)


def test_cli_convert_round_trips_the_released_layout(tiny, tmp_path, capsys):
    from kandinsky3.cli import main

    unet = tiny[0]
    fork_folder(tmp_path / "fork", unet, random_adapter(unet, seed=13))
    assert main(["convert", str(tmp_path / "fork"), str(tmp_path / "native"), "--to", "native"]) == 0
    assert "IP-Adapter, native layout" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "back"), "--to", "fork"]) == 0
    a, b = load_file(tmp_path / "fork" / FORK_UNET_FILES[0]), load_file(tmp_path / "back" / FORK_UNET_FILES[0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "x"), "--to", "diffusers"]) != 0
    assert "convert it --to native or --to fork" in capsys.readouterr().err
