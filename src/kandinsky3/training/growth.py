"""Grow a trained model: start a larger config (new attention blocks in the U-Net, more T5 layers) from the
weights of a smaller one, so the grown model computes exactly what its source did and training only has to
learn what the new blocks add.

Every new block is a residual branch (``x + f(x)``); zeroing the last layer of each branch makes ``f = 0`` at
step 0, the same trick ControlNet uses for its zero convolutions. Gradients still reach those last layers
(their inputs are not zero), so the branches open up during the first steps.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..checkpoints.io import CheckpointError, load_into
from ..models.unet import AttentionBlock


def _residual_outputs(block: nn.Module) -> list[nn.Module] | None:
    """The last layers of a block's residual branches, or None if it is not a block that can be grown."""
    if isinstance(block, AttentionBlock):
        return [block.attention.output_layer, block.feed_forward[-1]]
    from transformers.models.t5.modeling_t5 import T5Block

    if isinstance(block, T5Block):
        return [block.layer[0].SelfAttention.o, block.layer[-1].DenseReluDense.wo]
    return None


def grow_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> list[str]:
    """Load ``state_dict`` into ``module`` whose config adds whole blocks; zero the new blocks' outputs.

    Every parameter of the source must exist in the grown model with the same shape, and every new parameter
    must belong to a new U-Net ``AttentionBlock`` or T5 layer; anything else is a config mismatch and raises.
    Returns the names of the new blocks.
    """
    own = module.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    if unexpected:
        raise CheckpointError(
            f"{what} has {len(unexpected)} weights the grown model lacks (e.g. {unexpected[:3]}): "
            "growing can only add blocks, not remove them"
        )
    load_into(module, state_dict, what, strict=False)
    missing = set(own) - set(state_dict)
    grown, covered = [], set()
    for name, block in module.named_modules():
        keys = {f"{name}.{k}" for k in block.state_dict()}
        outputs = _residual_outputs(block)
        if outputs is None or not keys or not keys <= missing:
            continue
        with torch.no_grad():
            for layer in outputs:
                layer.weight.zero_()
        grown.append(name)
        covered |= keys
    if missing - covered:
        rest = sorted(missing - covered)
        raise CheckpointError(
            f"{what} lacks {len(rest)} weights that are not in a new attention block or T5 layer "
            f"(e.g. {rest[:3]}): only added blocks can start from zero; check the model config"
        )
    return grown
