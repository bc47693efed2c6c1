"""The IP-Adapter (spec §8.2): image embedding → image tokens, and the decoupled cross-attention's image path.

- ``image_proj`` = Linear(D → N·context_dim, bias), reshaped to (B, N, context_dim), then ``image_norm`` =
  LayerNorm(context_dim): N = 4 image tokens (D = 768 for the released CLIP ViT-L/14 adapter).
- In every **text cross-attention** layer X of the U-Net (18 in the released configs): ``X.processor.to_key_ip``,
  ``to_v_ip`` (context_dim → C, bias) and a zero-initialised ``to_out_ip`` (C → C, bias). The layer's output becomes
  ``output_layer(text attention) + image_weight · to_out_ip(attention(q, k_ip, v_ip))`` with the text query and
  heads, scale head_dim^−½, no mask on the image tokens. Self-attention and the feature pooling are untouched.

The adapter's state dict has exactly the released key names (``image_proj.*``, ``image_norm.*``,
``<layer>.processor.to_{key_ip,v_ip,out_ip}.*``): the per-layer modules sit in a tree of ``ModuleDict`` s named like
the U-Net's attention modules. :meth:`IPAdapter.attach` lends each layer to its U-Net attention (``Attention.ip``);
the U-Net's own state dict does not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import FrozenConfig
from .unet import Attention, AttentionBlock, UNet, UNetConfig

NUM_IMAGE_TOKENS = 4


def cross_attention_layers(unet: UNet | UNetConfig) -> list[tuple[str, int]]:
    """(name, width) of every text cross-attention ``Attention`` of a U-Net, in forward order of construction:
    ``down_samples.{l}.resnet_attn_blocks.{i}.1.attention`` and the same under ``up_samples``."""
    if isinstance(unet, UNetConfig):
        with torch.device("meta"):
            unet = UNet(unet)
    out = []
    for name, module in unet.named_modules():
        if isinstance(module, AttentionBlock) and ".resnet_attn_blocks." in name:
            out.append((f"{name}.attention", module.attention.to_query.out_features))
    return out


@dataclass(frozen=True)
class IPAdapterConfig(FrozenConfig):
    """An IP-Adapter's shape: the image embedding width, the number of image tokens, and the U-Net it belongs to
    (its text cross-attention layers and their widths, its context width and head size)."""

    image_embed_dim: int = 768
    num_tokens: int = NUM_IMAGE_TOKENS
    unet: UNetConfig = field(default_factory=UNetConfig)

    def to_dict(self) -> dict:
        return {"image_embed_dim": self.image_embed_dim, "num_tokens": self.num_tokens, "unet": self.unet.to_dict()}

    @classmethod
    def from_dict(cls, data, where: str = ""):
        data = dict(data)
        unet = UNetConfig.from_dict(data.pop("unet", {}))
        return cls(unet=unet, **data)


class IPAttention(nn.Module):
    """The image path of one decoupled cross-attention layer (the released ``Kandi3AttnProcessorIpAdapter``'s
    parameters): keys and values of the image tokens, and a zero-initialised output projection."""

    def __init__(self, width: int, context_dim: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.to_key_ip = nn.Linear(context_dim, width)
        self.to_v_ip = nn.Linear(context_dim, width)
        self.to_out_ip = nn.Linear(width, width)
        nn.init.zeros_(self.to_out_ip.weight)
        nn.init.zeros_(self.to_out_ip.bias)

    def forward(self, q: torch.Tensor, image_tokens: torch.Tensor, image_weight=1.0) -> torch.Tensor:
        """``q`` (B, heads, L, d): the text attention's query; ``image_tokens`` (B, N, context_dim) → (B, L, C)."""
        b, heads, length, d = q.shape
        tokens = image_tokens.to(q.dtype)
        k = self.to_key_ip(tokens).view(b, -1, heads, d).transpose(1, 2)
        v = self.to_v_ip(tokens).view(b, -1, heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, heads * d)
        out = self.to_out_ip(out)
        if torch.is_tensor(image_weight) and image_weight.ndim:
            return out * image_weight.to(out.dtype).view(-1, 1, 1)
        return out * image_weight


class IPAdapter(nn.Module):
    """Image projection + the image path of every text cross-attention layer of one U-Net configuration."""

    def __init__(self, config: IPAdapterConfig):
        super().__init__()
        self.config = config
        u = config.unet
        if u.context_dim is None:
            raise ValueError("an IP-Adapter needs a U-Net with text cross-attention (context_dim is None)")
        self.image_proj = nn.Linear(config.image_embed_dim, config.num_tokens * u.context_dim)
        self.image_norm = nn.LayerNorm(u.context_dim)
        self.layer_names: list[str] = []
        for name, width in cross_attention_layers(u):
            self._place(name + ".processor", IPAttention(width, u.context_dim, u.head_dim))
            self.layer_names.append(name)
        if not self.layer_names:
            raise ValueError("this U-Net configuration has no text cross-attention layer for an IP-Adapter")

    def _place(self, name: str, module: nn.Module):
        parent: nn.Module = self
        *path, last = name.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.ModuleDict())
            parent = parent._modules[part]
        parent.add_module(last, module)

    def layer(self, name: str) -> IPAttention:
        """The image path of the U-Net attention ``name``."""
        return self.get_submodule(name + ".processor")

    def layers(self) -> list[tuple[str, IPAttention]]:
        return [(name, self.layer(name)) for name in self.layer_names]

    def image_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP ``image_embeds`` (B, D) → image tokens (B, N, context_dim)."""
        p = self.image_proj.weight
        tokens = self.image_proj(image_embeds.to(p.device, p.dtype))
        return self.image_norm(tokens.view(image_embeds.shape[0], self.config.num_tokens, -1))

    # -- attaching to a U-Net ------------------------------------------------------------------------------------

    def check_fits(self, unet: UNet):
        """Raise a clear error when this adapter was made for another U-Net size."""
        expected = cross_attention_layers(unet)
        mine = [(n, layer.to_out_ip.out_features) for n, layer in self.layers()]
        context = unet.config.context_dim
        if mine != expected or self.image_proj.out_features != self.config.num_tokens * (context or 0):
            raise ValueError(
                f"this IP-Adapter was made for another U-Net: {len(mine)} cross-attention layers of widths "
                f"{sorted({w for _, w in mine})} and context {self.image_proj.out_features // self.config.num_tokens}, "
                f"the U-Net has {len(expected)} of widths {sorted({w for _, w in expected})} and context {context}. "
                "Load the adapter trained for this model (e.g. the nano adapter for nano, the released one for base)"
            )

    def attach(self, unet: UNet) -> "IPAdapter":
        """Lend each layer to its U-Net attention (``Attention.ip``); the U-Net's parameters are not touched."""
        self.check_fits(unet)
        for name, layer in self.layers():
            attention = unet.get_submodule(name)
            assert isinstance(attention, Attention)
            object.__setattr__(attention, "ip", layer)  # an instance attribute, not a registered submodule
        return self

    @torch.no_grad()
    def init_from_text_path(self, unet: UNet) -> "IPAdapter":
        """Start every layer's image keys/values as copies of its text keys/values (bias 0), as the IP-Adapter paper
        initialises them, so the projection only has to put image tokens where the frozen layer already reads text;
        ``to_out_ip`` stays zero, so the U-Net's output is unchanged until it learns."""
        self.check_fits(unet)
        for name, layer in self.layers():
            attention = unet.get_submodule(name)
            for ip, text in ((layer.to_key_ip, attention.to_key), (layer.to_v_ip, attention.to_value)):
                ip.weight.copy_(text.weight)
                ip.bias.zero_()
        return self

    @staticmethod
    def detach(unet: UNet):
        for module in unet.modules():
            if isinstance(module, Attention) and "ip" in module.__dict__:
                del module.__dict__["ip"]

    def extra_repr(self) -> str:
        return f"{len(self.layer_names)} cross-attention layers, {self.config.num_tokens} image tokens"
