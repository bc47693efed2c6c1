"""Loading and converting the official, diffusers and native layouts; refusing bad files with clear errors."""

import os
import pickle

import numpy as np
import pytest
import torch

from kandinsky3 import CheckpointError, Kandinsky3
from kandinsky3.checkpoints import convert, detect_layout, load_file, read
from kandinsky3.checkpoints.loading import fetch_command, resolve


def assert_same_image(a, b):
    """Same weights loaded two ways: equal up to one uint8 level (CPU kernels may round differently on
    differently-placed copies of the same tensors)."""
    x, y = np.asarray(a, dtype=int), np.asarray(b, dtype=int)
    assert x.shape == y.shape
    assert np.abs(x - y).max() <= 1 and np.abs(x - y).mean() < 0.05


@pytest.fixture(scope="module")
def official_dir(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    tiny.save_pretrained(root, layout="official")
    return root


def test_official_layout_files(official_dir):
    w = official_dir / "weights"
    for f in ["kandinsky3.pt", "movq.pt", "flan_ul2_encoder/projection.pt", "flan_ul2_encoder/config.json"]:
        assert (w / f).is_file(), f
    blob = torch.load(w / "kandinsky3.pt", weights_only=True)
    assert set(blob) == {"unet", "null_embedding"} and blob["null_embedding"].shape == (64,)
    assert detect_layout(official_dir) == "official"


def test_official_folder_loads_and_generates_the_same(tiny, official_dir):
    loaded = Kandinsky3.from_pretrained(official_dir, device="cpu")
    assert loaded.unet.config == tiny.unet.config  # inferred from shapes alone
    a = tiny.generate("a red circle", seed=3, steps=5, progress=False)
    b = loaded.generate("a red circle", seed=3, steps=5, width=64, height=64, progress=False)
    assert_same_image(a[0], b[0])


def test_official_to_diffusers_to_official_is_bit_identical(official_dir, tmp_path):
    convert(official_dir, tmp_path / "diffusers", to="diffusers")
    assert detect_layout(tmp_path / "diffusers") == "diffusers"
    assert (tmp_path / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    convert(tmp_path / "diffusers", tmp_path / "back", to="official")
    before, after = read(official_dir), read(tmp_path / "back")
    for name in ("unet", "projection", "movq"):
        a, b = getattr(before, name), getattr(after, name)
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), name
    assert torch.equal(before.null_embedding, after.null_embedding)
    raw = torch.load(official_dir / "weights/kandinsky3.pt", weights_only=True)["unet"]
    back = torch.load(tmp_path / "back/weights/kandinsky3.pt", weights_only=True)["unet"]
    assert list(raw) == list(back)


def test_diffusers_folder_loads_in_diffusers_itself(tiny, official_dir, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    convert(official_dir, tmp_path / "d", to="diffusers")
    unet = diffusers.Kandinsky3UNet.from_pretrained(tmp_path / "d" / "unet").eval()
    movq = diffusers.VQModel.from_pretrained(tmp_path / "d" / "movq").eval()
    assert movq.config.norm_type == "spatial"
    # the loaded models compute what ours (the weights official_dir was written from) do; diffusers' U-Net
    # applies the text projection itself
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0])
    raw = torch.randn(1, 5, tiny.text_encoder.projection[0].in_features, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        ours = tiny.unet(x, t, tiny.text_encoder.projection(raw), mask)
        theirs = unet(x, t, raw, mask).sample
        assert ours.abs().mean() > 0.01 and (ours - theirs).abs().max() <= 1e-4
        z, z_ref = tiny.movq.encode(image), movq.encode(image).latents
        assert (z - z_ref).abs().max() <= 1e-4
        assert (tiny.movq.decode(z) - movq.decode(z, force_not_quantize=True).sample).abs().max() <= 1e-4


def test_native_safetensors_round_trip(tiny, official_dir, tmp_path):
    convert(official_dir, tmp_path / "native", to="native")
    assert detect_layout(tmp_path / "native") == "native"
    assert (tmp_path / "native" / "unet.safetensors").is_file()
    pipe = Kandinsky3.from_pretrained(tmp_path / "native", device="cpu")
    a = tiny.generate("a blue star", seed=1, steps=4, progress=False)
    b = pipe.generate("a blue star", seed=1, steps=4, width=64, height=64, progress=False)
    assert_same_image(a[0], b[0])


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"unet": Payload()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_file(path)


def test_pickle_with_non_tensor_object_is_refused(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"unet": {"w": torch.zeros(2)}, "extra": Payload}, path)  # a class object, not a tensor
    with pytest.raises(CheckpointError, match="refused"):
        load_file(path)


def test_corrupt_files(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(CheckpointError, match="corrupt|refused"):
        load_file(tmp_path / "bad.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_file(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty"),
        (b"hello\n", "neither a zip archive nor a pickle"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "Git LFS pointer"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "web page"),
        (b"\x80\x02K\x01.garbage", "corrupt or not a PyTorch checkpoint"),  # a pickle, then a broken one
    ],
)
def test_files_that_are_not_checkpoints_are_named_so(tmp_path, content, reason):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason) as info:
        load_file(path)
    assert "()" not in str(info.value) and "re-download" in str(info.value)
    if reason in ("empty", "Git LFS pointer", "web page"):  # what a failed download leaves, in any format
        path = path.rename(tmp_path / "model.safetensors")
        with pytest.raises(CheckpointError, match=reason):
            load_file(path)


def test_running_out_of_memory_is_not_called_corruption(tmp_path, monkeypatch):
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pt")

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(MemoryError):
        load_file(tmp_path / "w.pt")


def test_legacy_pickle_checkpoints_still_load(tmp_path):
    torch.save({"w": torch.arange(3.0)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_file(tmp_path / "old.pt")["w"], torch.arange(3.0))


def test_truncated_official_unet_is_a_clear_error(official_dir, tmp_path):
    import shutil

    shutil.copytree(official_dir, tmp_path / "m")
    blob = torch.load(tmp_path / "m/weights/kandinsky3.pt", weights_only=True)
    del blob["unet"]["out_layer.2.weight"]
    torch.save(blob, tmp_path / "m/weights/kandinsky3.pt")
    with pytest.raises(CheckpointError, match="missing"):
        Kandinsky3.from_pretrained(tmp_path / "m", device="cpu")


def test_an_official_folder_with_one_other_unet_is_read_as_that_variant(official_dir, tmp_path):
    """A folder fetched for Flash alone (the offline hint's command) loads without --variant; with base's U-Net
    beside it, base stays the default."""
    import shutil

    from kandinsky3.checkpoints.layouts import read_official

    shutil.copytree(official_dir, tmp_path / "m")
    w = tmp_path / "m" / "weights"
    shutil.copy(w / "kandinsky3.pt", w / "kandinsky3_flash.pt")
    shutil.copy(w / "flan_ul2_encoder/projection.pt", w / "flan_ul2_encoder/projection_flash.pt")
    (w / "kandinsky3.config.json").unlink()  # as released: no side file, configs read from the shapes
    assert read_official(tmp_path / "m").variant.unet_file == "weights/kandinsky3.pt"
    (w / "kandinsky3.pt").unlink()
    flash = read_official(tmp_path / "m")
    assert flash.variant.name == "flash-custom" and flash.variant.sampler.kind == "flash"


def test_missing_files_are_named(official_dir, tmp_path):
    import shutil

    shutil.copytree(official_dir, tmp_path / "m")
    (tmp_path / "m/weights/movq.pt").unlink()
    with pytest.raises(CheckpointError, match="movq.pt"):
        Kandinsky3.from_pretrained(tmp_path / "m", device="cpu")


def test_offline_hub_error_names_files_and_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError) as info:
        resolve("base", local_files_only=True)
    text = str(info.value)
    assert (
        "weights/kandinsky3.pt" in text and "weights/movq.pt" in text and "hf download ai-forever/Kandinsky3.1" in text
    )
    assert "`--model ./Kandinsky3.1`" in text  # base is the folder's default: no --variant
    assert fetch_command("a/b", ["x.pt"]) == "hf download a/b --include 'x.pt' --local-dir ./b"
    with pytest.raises(CheckpointError) as info:
        resolve("flash", local_files_only=True)
    assert "kandinsky3_flash.pt" in str(info.value) and "`--model ./Kandinsky3.1 --variant flash`" in str(info.value)
    with pytest.raises(CheckpointError, match="kandinsky3_flash.pt"):  # the official repo id + variant: its files
        resolve("ai-forever/Kandinsky3.1", local_files_only=True, variant_name="flash")
    monkeypatch.setattr("kandinsky3.checkpoints.loading._download", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(ValueError, match="'base' is a registered model"):  # refused before any download
        resolve("base", variant_name="flash")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'kandinsky9'.*nano"):
        Kandinsky3.from_pretrained("kandinsky9")


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    from kandinsky3.checkpoints import io

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        io.save_torch({"a": torch.zeros(1)}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []
