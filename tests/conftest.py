import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    from kandinsky3 import Kandinsky3

    return Kandinsky3.from_pretrained("tiny", device="cpu")


@pytest.fixture(scope="session")
def nano():
    """The embedded default model, shared by the session: tests must not change it (or restore what they change)."""
    from kandinsky3 import Kandinsky3

    return Kandinsky3.from_pretrained("nano", device="cpu")


@pytest.fixture(scope="session")
def tiny_inpainting():
    from dataclasses import replace

    from kandinsky3 import Kandinsky3
    from kandinsky3.checkpoints import tiny_components
    from kandinsky3.registry import VARIANTS

    v = VARIANTS["tiny"]
    v = replace(
        v,
        name="tiny-inpainting",
        unet=replace(v.unet, num_channels=9),
        sampler=replace(v.sampler, guidance=4.0, threshold_percentile=0.95),
        inpainting=True,
    )
    return Kandinsky3(tiny_components(v, seed=1))
