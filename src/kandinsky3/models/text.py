"""Text conditioning (spec §2): T5 tokens → T5 encoder → projection → (context, mask), and the null branch.

The tokenizer is any ``transformers`` tokenizer with pad id 0 and an EOS it appends itself (the T5
sentencepiece tokenizer for the released models, a word-level ``tokenizer.json`` for nano).
"""

from __future__ import annotations

import torch
from torch import nn

TOKENS_LENGTH = 128


def make_projection(encoder_dim: int, context_dim: int) -> nn.Sequential:
    """``Sequential(Linear(enc→ctx, no bias), LayerNorm(ctx))``; its keys are ``0.weight``, ``1.weight``, ``1.bias``."""
    return nn.Sequential(nn.Linear(encoder_dim, context_dim, bias=False), nn.LayerNorm(context_dim))


class TextEncoder(nn.Module):
    """Tokenise prompts and encode them the official way.

    encoder: a ``transformers`` T5 encoder (``T5EncoderModel`` or its ``encoder`` stack);
    projection: ``make_projection(...)``; null_embedding: (context_dim,) vector for the unconditional branch, or
    None for diffusers-format weights (then the unconditional context is the projection of zeros, fully masked).
    """

    def __init__(
        self,
        tokenizer,
        encoder: nn.Module,
        projection: nn.Sequential,
        null_embedding: torch.Tensor | None = None,
        max_length: int = TOKENS_LENGTH,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.projection = projection
        self.max_length = max_length
        if null_embedding is not None:
            null_embedding = null_embedding.reshape(-1).float()
        self.register_buffer("null_embedding", null_embedding, persistent=False)

    @property
    def context_dim(self) -> int:
        return self.projection[1].normalized_shape[0]

    @property
    def device(self) -> torch.device:
        return self.projection[0].weight.device

    # -- tokens --------------------------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return self._batch_ids([text])[0]

    def _batch_ids(self, texts: list[str]) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id
        rows = self.tokenizer(list(texts), max_length=self.max_length, truncation=True)["input_ids"]
        # word-level tokenizers may not append EOS themselves
        return [ids if eos is None or (ids and ids[-1] == eos) else ids[: self.max_length - 1] + [eos] for ids in rows]

    def _pad(self, ids: list[int]) -> torch.Tensor:
        pad = self.tokenizer.pad_token_id or 0
        return torch.tensor(ids + [pad] * (self.max_length - len(ids)), dtype=torch.long)

    def read_report(self, texts: list[str]) -> tuple[list[str], int]:
        """What the encoder will not read of ``texts``: the words the tokenizer maps to its unknown token (nano's
        word-level vocabulary is small; the T5 sentencepiece one covers almost everything), each once, in order of
        appearance, punctuation not reported; and the most tokens any text has beyond the ``max_length`` read
        (EOS included), 0 when all fit."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        found: list[str] = []
        overflow = 0
        for text in texts:
            if not text:
                continue
            enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False, verbose=False)
            overflow = max(overflow, len(enc["input_ids"]) + 1 - self.max_length)
            for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
                word = text[start:end]
                if unk is not None and token == unk and any(c.isalnum() for c in word) and word not in found:
                    found.append(word)
        return found, overflow

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 128) ids right-padded with the pad id, and the mask (1 for real tokens, EOS included)."""
        ids = self._batch_ids(prompts)
        mask = torch.tensor([[1] * len(i) + [0] * (self.max_length - len(i)) for i in ids], dtype=torch.long)
        return torch.stack([self._pad(i) for i in ids]), mask

    def tokenize_negative(self, negatives: list[str], positive_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The official quirk: truncate to the positive's token count, last kept id → EOS, reuse the positive mask."""
        rows = []
        for text, mask in zip(negatives, positive_mask):
            n = int(mask.sum())
            ids = self._ids(text)[:n]
            ids[-1] = self.tokenizer.eos_token_id
            rows.append(self._pad(ids))
        return torch.stack(rows), positive_mask.clone()

    # -- encoding ------------------------------------------------------------------------------------------------

    def _encode_ids(self, ids: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
        ids, mask_dev = ids.to(self.device), mask.to(self.device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask_dev).last_hidden_state
        proj_dtype = self.projection[0].weight.dtype
        context = self.projection(hidden.to(proj_dtype))
        context = context * mask_dev[..., None].to(context.dtype)  # padding → exactly 0
        return context[:, :length]

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask from :meth:`tokenize` → (context, mask), cropped to the longest prompt + 1 as
        :meth:`encode` does, with gradients (training encodes pre-tokenised captions through this)."""
        length = min(int(mask.sum(1).max()) + 1, ids.shape[1])
        context = self._encode_ids(ids, mask, length)
        return context, mask[:, :length].to(context.device)

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompts: list[str] | None = None):
        """→ (context, mask, neg_context, neg_mask); cropped to the longest prompt + 1 (capped at 128).

        ``neg_*`` are None when no negative prompt is given (use :meth:`unconditional`). For the per-prompt crop
        lengths of a mixed batch see :meth:`crop_lengths`.
        """
        ids, mask = self.tokenize(prompts)
        length = min(int(mask.sum(1).max()) + 1, self.max_length)
        context = self._encode_ids(ids, mask, length)
        out_mask = mask[:, :length].to(context.device)
        if negative_prompts is None:
            return context, out_mask, None, None
        neg_ids, neg_mask = self.tokenize_negative(negative_prompts, mask)
        neg_context = self._encode_ids(neg_ids, neg_mask, length)
        return context, out_mask, neg_context, neg_mask[:, :length].to(context.device)

    @staticmethod
    def prompt_lengths(mask: torch.Tensor, max_length: int | None = None) -> torch.Tensor:
        """Each prompt's own official crop length: its tokens + 1, at most ``max_length`` — by default the width of
        ``mask`` as :meth:`encode` / :meth:`encode_ids` return it, cropped to the longest prompt + 1 or the cap."""
        return (mask.sum(1) + 1).clamp(max=mask.shape[1] if max_length is None else max_length)

    @classmethod
    def crop_lengths(cls, mask: torch.Tensor, max_length: int = TOKENS_LENGTH) -> torch.Tensor | None:
        """:meth:`prompt_lengths`, or None when all prompts share one (the U-Net's plain path)."""
        lengths = cls.prompt_lengths(mask, max_length)
        return None if bool((lengths == lengths[0]).all()) else lengths

    @torch.no_grad()
    def unconditional(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Null context shaped like ``like`` (B, L, D): ``null_embedding`` at position 0 (the only attended one)."""
        return self.null_context(like)

    def null_context(self, like: torch.Tensor, null_embedding: torch.Tensor | None = None):
        """:meth:`unconditional` with gradients: the one null context, for inference and for training's
        classifier-free-guidance dropout. ``null_embedding`` replaces the stored one (training passes its
        trainable parameter, so the context stays in the graph)."""
        b, length, _ = like.shape
        mask = torch.zeros(b, length, dtype=torch.long, device=like.device)
        embedding = self.null_embedding if null_embedding is None else null_embedding
        if embedding is None:  # diffusers convention: projected zeros, nothing attended
            zeros = torch.zeros(
                1, 1, self.projection[0].in_features, device=self.device, dtype=self.projection[0].weight.dtype
            )
            return self.projection(zeros).to(like).expand(b, length, -1).clone(), mask
        context = torch.zeros_like(like)
        context[:, 0] = embedding.to(like)
        mask[:, 0] = 1
        return context, mask


def new_t5_encoder(
    vocab_size: int,
    d_model: int = 128,
    d_ff: int | None = None,
    d_kv: int = 32,
    num_layers: int = 2,
    num_heads: int | None = None,
    buckets: int = 16,
    max_distance: int = 32,
) -> nn.Module:
    """An untrained T5 encoder (gated-SiLU, no dropout, pad 0 / EOS 1) of the nano family's shape: ``d_ff``
    defaults to 2·d_model and ``num_heads`` to d_model / d_kv. Its weights are drawn from the global RNG (build it
    inside ``models.seeding.drawing_from`` to draw from a generator)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=d_ff or 2 * d_model,
        d_kv=d_kv,
        num_layers=num_layers,
        num_heads=num_heads or d_model // d_kv,
        feed_forward_proj="gated-silu",
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=max_distance,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    return T5EncoderModel(config)


def build_word_tokenizer(words: list[str], model_max_length: int = TOKENS_LENGTH):
    """A word-level ``PreTrainedTokenizerFast`` with T5's special ids (pad 0, eos 1, unk 2) that appends EOS.

    Used by the nano family and the tiny test preset, where a sentencepiece model would be overkill.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=model_max_length
    )
