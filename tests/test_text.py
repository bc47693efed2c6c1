"""Tokenisation and text-conditioning quirks of the official code (spec §2)."""

import pytest
import torch


@pytest.fixture(scope="module")
def text(tiny):
    return tiny.text_encoder


def test_tokenize_pads_to_128_with_eos(text):
    ids, mask = text.tokenize(["a red circle"])
    assert ids.shape == mask.shape == (1, 128)
    assert mask[0, :4].tolist() == [1, 1, 1, 1] and mask[0, 4:].sum() == 0
    assert ids[0, 3] == text.tokenizer.eos_token_id and ids[0, 4:].eq(0).all()


def test_negative_prompt_quirk(text):
    _, pos_mask = text.tokenize(["a red circle on the left"])  # 6 words + EOS = 7 tokens
    long_ids, long_mask = text.tokenize_negative(["a blue square in the top left at the bottom"], pos_mask)
    assert long_ids[0, :7].ne(0).all() and long_ids[0, 7:].eq(0).all()  # truncated to the prompt's count
    assert long_ids[0, 6] == text.tokenizer.eos_token_id  # last kept id overwritten with EOS
    assert torch.equal(long_mask, pos_mask)  # the positive prompt's mask, not its own
    short_ids, short_mask = text.tokenize_negative(["blue"], pos_mask)
    assert short_ids[0, 1] == text.tokenizer.eos_token_id and short_ids[0, 2:].eq(0).all()
    assert torch.equal(short_mask, pos_mask)  # pad positions marked as attended, as the official code does


def test_encode_crops_to_longest_plus_one_and_zeroes_padding(text):
    context, mask, neg, neg_mask = text.encode(["a red circle", "a big blue star on the left"])
    assert context.shape == (2, 9, text.context_dim)  # longest: 7 words + EOS = 8 tokens, plus one slot
    assert mask.shape == (2, 9) and neg is None and neg_mask is None
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0] and mask[1].sum() == 8
    assert context[0, 4:].abs().sum() == 0 and context[1, 8:].abs().sum() == 0
    assert context[0, :4].abs().sum() > 0


def test_null_context(text):
    context, mask, _, _ = text.encode(["a red circle"])
    null, null_mask = text.unconditional(context)
    assert null.shape == context.shape and null_mask.tolist() == [[1, 0, 0, 0, 0]]
    assert torch.equal(null[0, 0], text.null_embedding) and null[0, 1:].abs().sum() == 0


def test_empty_prompt_is_valid(text):
    context, mask, _, _ = text.encode([""])
    assert mask.tolist() == [[1, 0]] and context.shape[1] == 2
