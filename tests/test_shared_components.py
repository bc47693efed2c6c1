"""A native model folder that retrains only the U-Net (nano-flash) may share the text encoder, projection and MoVQ
of another model instead of holding a copy: its kandinsky3.json names that model under "shares"."""

import json
import shutil

import numpy as np
import pytest

from kandinsky3 import Kandinsky3
from kandinsky3.checkpoints.io import CheckpointError


def test_a_folder_sharing_components_loads_exactly_like_the_complete_one(tmp_path, tiny):
    full = tmp_path / "full"
    tiny.save_pretrained(full)
    lean = tmp_path / "lean"
    lean.mkdir()
    shutil.copy(full / "unet.safetensors", lean / "unet.safetensors")
    meta = json.loads((full / "kandinsky3.json").read_text())
    (lean / "kandinsky3.json").write_text(json.dumps({**meta, "shares": "../full"}))
    a = Kandinsky3.from_pretrained(str(full), device="cpu").generate("a red circle", seed=0, steps=2, progress=False)
    b = Kandinsky3.from_pretrained(str(lean), device="cpu").generate("a red circle", seed=0, steps=2, progress=False)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))

    (lean / "kandinsky3.json").write_text(json.dumps({**meta, "shares": "../missing"}))
    with pytest.raises(CheckpointError, match="shares its text encoder and MoVQ with '../missing'"):
        Kandinsky3.from_pretrained(str(lean), device="cpu")
