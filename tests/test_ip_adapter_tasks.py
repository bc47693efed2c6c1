"""IP-Adapter tasks on the tiny preset: variation / mix / image + text requests, the guidance pair the U-Net receives,
mixing rules, bad inputs, the CLI."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky3 import Kandinsky3, Mix, TextToImage, Variation, read_metadata
from kandinsky3.checkpoints.io import CheckpointError
from kandinsky3.checkpoints.ip_adapter import load_ip_adapter, read_ip_adapter, save_ip_adapter
from kandinsky3.cli import build_parser, request_from_args
from kandinsky3.diffusion.image_prompt import mix_embeddings
from kandinsky3.models.clip import nano_clip_config, nano_image_processor
from kandinsky3.models.ip_adapter import IPAdapter, IPAdapterConfig
from kandinsky3.registry import VARIANTS
from kandinsky3.world import world_sample

SETTINGS = dict(steps=3, progress=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny CLIP (32 px) and a random tiny-U-Net adapter in the native layout, twice: read-empty-text as zeros
    (released) and as the null context (nano)."""
    from transformers import CLIPModel

    root = tmp_path_factory.mktemp("ip")
    torch.manual_seed(0)
    config = nano_clip_config(50, image_size=32, patch_size=8, width=32, vision_layers=1, text_layers=1, heads=2,
                              projection_dim=16)  # fmt: skip
    CLIPModel(config).save_pretrained(root / "clip")
    nano_image_processor(32).save_pretrained(root / "clip")
    adapter = IPAdapter(IPAdapterConfig(image_embed_dim=16, unet=VARIANTS["tiny"].unet))
    for p in adapter.parameters():
        p.data.normal_(0, 0.1)
    for text in ("zeros", "null"):
        save_ip_adapter(adapter, root / text, name=f"tiny-{text}", text=text, image_encoder=str(root / "clip"))
    return root


@pytest.fixture(scope="module")
def pipe(folders):
    pipe = Kandinsky3.from_pretrained("tiny", device="cpu")
    pipe.get_ip_adapter(folders / "zeros")
    return pipe


def ref(i=0):
    return world_sample(i).image


def same(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_mix_with_weights_one_zero_equals_the_single_image_exactly(pipe):
    single = pipe.variation(ref(0), seed=3, **SETTINGS)[0]
    mixed = pipe.mix([ref(0), ref(1)], [1.0, 0.0], seed=3, **SETTINGS)[0]
    assert same(single, mixed)
    other = pipe.mix([ref(0), ref(1)], [0.5, 0.5], seed=3, **SETTINGS)[0]
    assert not same(single, other)


def test_an_images_embedding_does_not_depend_on_the_images_beside_it(pipe):
    from kandinsky3.tasks import image_embeddings

    pair, _ = image_embeddings(pipe, [ref(0), ref(1)])
    alone, _ = image_embeddings(pipe, [ref(0)])
    assert torch.equal(pair[:1], alone)  # so mixing (1, 0) is the single image bit for bit


def test_variation_of_a_list_is_each_image_alone(pipe):
    both = pipe.variation([ref(0), ref(1)], seed=[4, 5], **SETTINGS)
    assert same(both[1], pipe.variation(ref(1), seed=5, **SETTINGS)[0])


def test_mixing_rules():
    e = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(mix_embeddings(e, [0.6, 0.4]), torch.tensor([[1.8, 0.4]]))  # Σ wᵢ·eᵢ (released)
    assert torch.equal(mix_embeddings(e, [1.0, 0.0]), e[:1])
    mean = mix_embeddings(e, [0.5, 0.5], "mean")  # equal directions at the mean norm 2
    assert torch.allclose(mean, torch.tensor([[2**0.5, 2**0.5]]))
    assert torch.allclose(mix_embeddings(e, [2.0, 2.0], "mean"), mean)  # the weights' scale does not matter
    with pytest.raises(ValueError, match="one weight per image"):
        mix_embeddings(e, [1.0])


def unet_calls(pipe, request):
    """Run ``request`` and record the keyword inputs of every U-Net call."""
    calls = []
    unet_forward = pipe.unet.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return unet_forward(*args, **kwargs)

    pipe.unet.forward = spy
    try:
        pipe.run(request, progress=False)
    finally:
        del pipe.unet.forward
    return calls


def test_guidance_pair_is_text_and_image_vs_zero_text_and_zero_image(pipe):
    parts = pipe.get_ip_adapter()
    image = ref(2)
    calls = unet_calls(
        pipe, TextToImage(prompt="a red circle", image=image, image_weight=0.7, steps=2, guidance=3.0, seed=0)
    )
    embeds = parts.encoder.encode([image])
    zero = parts.encoder.zero_embedding()
    # the zero-image feature: CLIP of an all-zero normalised picture
    assert torch.equal(zero, parts.encoder(torch.zeros(1, 3, 32, 32)))
    for kw in calls:
        tokens = kw["image_tokens"]
        assert tokens.shape[0] == 2  # cond first, then uncond
        assert torch.allclose(tokens[0], parts.adapter.image_tokens(embeds)[0], atol=1e-6)
        assert torch.allclose(tokens[1], parts.adapter.image_tokens(zero)[0], atol=1e-6)
        assert torch.equal(kw["image_weight"], torch.tensor([0.7, 0.7]))
        assert kw["context"][0].abs().sum() > 0 and kw["context_mask"][0].sum() > 0  # the prompt
        assert not kw["context"][1].any() and not kw["context_mask"][1].any()  # all-zero text and mask (released)


def image_weights(calls) -> list[list[float]]:
    return [[round(w, 6) for w in kw["image_weight"].tolist()] for kw in calls]


def test_early_boost_multiplies_the_image_weight_over_the_first_steps_only(pipe):
    request = TextToImage(prompt="a red circle", image=ref(2), image_weight=0.7, steps=5, guidance=3.0, seed=0)
    assert image_weights(unet_calls(pipe, request)) == [[0.7, 0.7]] * 5  # no boost: the released behaviour
    boosted = replace(request, early_boost=3.0, early_fraction=0.4)  # int(5·0.4) = 2 steps
    assert image_weights(unet_calls(pipe, boosted)) == [[2.1, 2.1]] * 2 + [[0.7, 0.7]] * 3
    unguided = Variation(image=ref(0), steps=4, guidance=0.0, seed=0, early_boost=2.0, early_fraction=0.5)
    assert image_weights(unet_calls(pipe, unguided)) == [[2.0]] * 2 + [[1.0]] * 2  # one call a step, counted alike
    # a boost at full fraction equals the weight times the boost at every step, bit for bit
    everywhere = pipe.variation(ref(0), seed=1, early_boost=1.5, early_fraction=1.0, **SETTINGS)[0]
    assert same(everywhere, pipe.variation(ref(0), seed=1, image_weight=1.5, **SETTINGS)[0])
    # and it is off after each run: a second run counts its steps afresh
    assert image_weights(unet_calls(pipe, unguided)) == [[2.0]] * 2 + [[1.0]] * 2
    # k3 at 60 steps makes 59 calls (stride 17): the fraction is of the calls made, 29 of them here
    sixty = replace(unguided, steps=60, early_fraction=0.5)
    assert image_weights(unet_calls(pipe, sixty)) == [[2.0]] * 29 + [[1.0]] * 30
    # an explicit boost with an adapter that records no fraction would change nothing: a clear error instead
    with pytest.raises(ValueError, match="early_boost 3 would apply to no step.*--early-fraction"):
        pipe.variation(ref(0), early_boost=3.0, **SETTINGS)
    # the images say what steered them
    meta = read_metadata(pipe.variation(ref(0), seed=1, early_boost=1.5, early_fraction=0.5, **SETTINGS)[0])
    assert (meta["ip_adapter"], meta["image_weight"], meta["early_boost"], meta["early_fraction"]) == (
        "tiny-zeros",
        1.0,
        1.5,
        0.5,
    )


def test_the_adapter_records_its_own_early_boost(pipe, folders, tmp_path):
    adapter = pipe.get_ip_adapter().adapter
    own = tmp_path / "own"
    save_ip_adapter(adapter, own, name="own", text="zeros", image_encoder=str(folders / "clip"),
                    sampling={"early_boost": 2.0, "early_fraction": 0.5})  # fmt: skip
    assert read_ip_adapter(own).sampling == {"early_boost": 2.0, "early_fraction": 0.5}
    assert read_ip_adapter(folders / "zeros").sampling == {}
    mine = Kandinsky3.from_pretrained("tiny", device="cpu")
    mine.get_ip_adapter(own)
    request = Variation(image=ref(0), steps=4, guidance=0.0, seed=0)
    assert image_weights(unet_calls(mine, request)) == [[2.0]] * 2 + [[1.0]] * 2  # the adapter's default
    assert image_weights(unet_calls(mine, replace(request, early_boost=1.0))) == [[1.0]] * 4  # the request wins
    assert image_weights(unet_calls(mine, replace(request, early_fraction=0.25))) == [[2.0]] + [[1.0]] * 3
    config = own / "ip_adapter.json"
    meta = json.loads(config.read_text())
    bad_values = ({"early_boost": "3", "early_fraction": 0.5}, {"early_boost": -1, "early_fraction": 0.5})
    bad_values += ({"early_boost": 2, "early_fraction": 1.5}, {"early_boost": 2}, {"boost": 2}, [2.0])
    for bad in bad_values:
        config.write_text(json.dumps({**meta, "sampling": bad}))
        with pytest.raises(CheckpointError, match="sampling"):
            read_ip_adapter(own)


def test_variation_text_branches_follow_the_adapter(pipe, folders):
    calls = unet_calls(pipe, Variation(image=ref(0), steps=1, guidance=2.0, seed=0))
    assert not calls[0]["context"].any() and not calls[0]["context_mask"].any()  # zeros in both branches
    nano_style = Kandinsky3.from_pretrained("tiny", device="cpu")
    nano_style.get_ip_adapter(folders / "null")
    calls = unet_calls(nano_style, Variation(image=ref(0), steps=1, guidance=2.0, seed=0))
    null = nano_style.text_encoder.null_embedding
    context, mask = calls[0]["context"], calls[0]["context_mask"]
    for row in range(2):  # the null context (what nano's adapter was trained with) in both branches
        assert torch.equal(context[row, 0], null) and not context[row, 1:].any()
        assert mask[row].tolist() == [1] + [0] * (mask.shape[1] - 1)


def test_image_features_are_built_at_guidance_zero_too(pipe):
    calls = unet_calls(pipe, Variation(image=ref(0), steps=1, guidance=0.0, seed=0))
    assert calls[0]["image_tokens"].shape[0] == 1 and calls[0]["image_tokens"].abs().sum() > 0


def test_image_modes_are_converted(pipe):
    rgb = ref(3)
    out = pipe.variation(rgb, seed=1, **SETTINGS)[0]
    with pytest.warns(UserWarning, match="transparency"):
        rgba = pipe.variation(rgb.convert("RGBA"), seed=1, **SETTINGS)[0]
    assert same(out, rgba)
    for mode in ("CMYK", "L", "P"):  # converted to RGB (CMYK and palette round trips may shift colours slightly)
        assert pipe.variation(rgb.convert(mode), seed=1, **SETTINGS)[0].size == out.size


def test_bad_inputs_are_clear_errors(pipe, folders, tmp_path):
    with pytest.raises(ValueError, match="one weight per image"):
        Mix(images=[ref(0), ref(1)], weights=[1.0])
    with pytest.raises(ValueError, match="weights must be finite numbers ≥ 0"):
        Mix(images=[ref(0), ref(1)], weights=[1.0, -0.5])
    with pytest.raises(ValueError, match="all 0"):
        Mix(images=[ref(0), ref(1)], weights=[0, 0])
    with pytest.raises(ValueError, match="image_weight"):
        Variation(image=ref(0), image_weight=-1)
    with pytest.raises(ValueError, match="image_weight"):
        TextToImage(prompt="a", image=ref(0), image_weight=float("nan"))
    with pytest.raises(ValueError, match="early_boost must be a finite number ≥ 0"):
        Variation(image=ref(0), early_boost=-2)
    with pytest.raises(ValueError, match=r"early_fraction must be a fraction of the steps in \[0, 1\]"):
        Mix(images=[ref(0)], early_fraction=1.5)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(Exception, match="notes.png"):
        pipe.variation(str(not_an_image), **SETTINGS)
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        pipe.generate(["a", "b", "c"], image=[ref(0), ref(1)], **SETTINGS)
    # an adapter made for another U-Net size
    other = IPAdapter(IPAdapterConfig(image_embed_dim=16, unet=VARIANTS["nano"].unet))
    save_ip_adapter(other, tmp_path / "nano-sized", name="nano-sized", text="null", image_encoder=str(folders / "clip"))
    with pytest.raises(CheckpointError, match="another U-Net size"):
        pipe.get_ip_adapter(tmp_path / "nano-sized")
    with pytest.raises(CheckpointError, match="has no IP-Adapter"):
        Kandinsky3.from_pretrained("tiny", device="cpu").variation(ref(0), **SETTINGS)


def test_offline_hub_encoder_is_a_clear_error(folders, tmp_path):
    raw = read_ip_adapter(folders / "zeros")
    with pytest.raises(CheckpointError, match="could not get"):
        load_ip_adapter(folders / "zeros", raw.config.unet, image_encoder="nobody/no-such-clip", local_files_only=True)


def test_cli_builds_the_same_requests(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["mix", "a.png", "b.png", "--weights", "0.6", "0.4", "--seed", "0"])
    req = request_from_args(Mix, args)
    assert req.images == ["a.png", "b.png"] and req.weights == [0.6, 0.4] and req.seed == 0
    args = parser.parse_args(["variation", "ref.png", "--image-weight", "0.5"])
    assert request_from_args(Variation, args).image_weight == 0.5
    args = parser.parse_args(["generate", "on a white background", "--image", "ref.png", "--image-weight", "0.7"])
    req = request_from_args(TextToImage, args)
    assert req.image == "ref.png" and req.image_weight == 0.7 and req.early_boost is None
    args = parser.parse_args(["variation", "ref.png", "--early-boost", "3", "--early-fraction", "0.3"])
    req = request_from_args(Variation, args)
    assert req.early_boost == 3.0 and req.early_fraction == 0.3


def test_cli_variation_writes_images(folders, tmp_path, monkeypatch):
    from kandinsky3.cli import main

    ref(0).save(tmp_path / "ref.png")
    calls = []
    real = Kandinsky3.get_ip_adapter

    def load(self, name_or_path=None, image_encoder=None, local_files_only=False):
        calls.append(name_or_path)
        return real(self, name_or_path or folders / "zeros", image_encoder, local_files_only)

    monkeypatch.setattr(Kandinsky3, "get_ip_adapter", load)
    out = tmp_path / "var.png"
    rc = main(["variation", str(tmp_path / "ref.png"), "--model", "tiny", "--steps", "2", "--seed", "0",
               "--num-images", "2", "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0 and (tmp_path / "var-0.png").is_file() and (tmp_path / "var-1.png").is_file()
    from kandinsky3 import read_metadata

    assert read_metadata(Image.open(tmp_path / "var-0.png"))["task"] == "variation"


def test_cli_loads_the_adapter_and_encoder_it_is_given(folders, tmp_path):
    """``--ip-adapter FOLDER --image-encoder FOLDER``: no monkeypatching, the folders are what the pipeline loads."""
    from kandinsky3.cli import main

    ref(0).save(tmp_path / "ref.png")
    argv = ["variation", str(tmp_path / "ref.png"), "--model", "tiny", "--steps", "2", "--seed", "0", "--no-progress"]
    argv += ["--ip-adapter", str(folders / "zeros"), "--image-encoder", str(folders / "clip")]
    assert main(argv + ["--out", str(tmp_path / "cli.png")]) == 0
    pipe = Kandinsky3.from_pretrained("tiny", device="cpu")
    pipe.get_ip_adapter(folders / "zeros", image_encoder=str(folders / "clip"))
    [image] = pipe.variation(ref(0), seed=0, steps=2, progress=False)
    assert same(Image.open(tmp_path / "cli.png"), image)
    assert main(argv[:-4] + ["--ip-adapter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_cli_mix_runs_at_the_settings_size(folders, tmp_path):
    """A mix has no single input image: its size is the settings' (the size check before loading once read a
    ``request.image`` that ``Mix`` does not have)."""
    from kandinsky3.cli import main

    ref(0).save(tmp_path / "a.png")
    ref(1).resize((48, 48)).save(tmp_path / "b.png")
    argv = ["mix", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--weights", "0.6", "0.4", "--model", "tiny"]
    argv += ["--steps", "2", "--seed", "0", "--no-progress", "--width", "128", "--height", "64"]
    argv += ["--ip-adapter", str(folders / "zeros"), "--out", str(tmp_path / "mix.png")]
    assert main(argv) == 0
    assert Image.open(tmp_path / "mix.png").size == (128, 64)
