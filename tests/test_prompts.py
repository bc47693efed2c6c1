"""Prompt beautification: the local LLM path on a tiny random Mistral, a real HTTP server, the template backend."""

import json
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from kandinsky3.prompts import (
    TEMPLATE,
    Beautifier,
    LocalLLM,
    ServerLLM,
    TemplateBeautifier,
    clean_text,
    fit_tokens,
    make_beautifier,
)


def test_clean_text():
    assert clean_text('Prompt: "A red circle,\n glowing softly"\n### User: more') == "A red circle, glowing softly"
    assert clean_text("  Expanded prompt:   a cat  ") == "a cat"


def test_fit_tokens_cuts_at_a_word_boundary(tiny):
    tok = tiny.text_encoder.tokenizer
    text = " ".join(["red circle"] * 100)
    cut, truncated = fit_tokens(text, tok, 128)
    assert truncated and len(tok(cut)["input_ids"]) <= 128 and text.startswith(cut)
    assert fit_tokens("a red circle", tok, 128) == ("a red circle", False)


@pytest.fixture(scope="module")
def tiny_mistral():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [TEMPLATE.format(prompt="a red circle in the top left")] * 4,
        vocab_size=300,
        special_tokens=["<s>", "</s>", "###"],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(
        MistralConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=1,
            eos_token_id=1,
            bos_token_id=0,
        )
    ).eval()
    return model, tokenizer


def test_local_backend_runs_the_template_token_by_token(tiny_mistral):
    model, tokenizer = tiny_mistral
    seen = {}
    original = model.generate

    def spy(**kwargs):
        seen["ids"] = kwargs["input_ids"].clone()
        return original(**kwargs)

    model.generate = spy
    try:
        backend = LocalLLM(model=model, tokenizer=tokenizer, max_new_tokens=12)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights may produce an empty answer → documented fallback
            result = backend("a red circle in the top left")
    finally:
        model.generate = original
    expected = TEMPLATE.format(prompt="a red circle in the top left")
    assert seen["ids"][0].tolist() == tokenizer(expected)["input_ids"]
    assert tokenizer.decode(seen["ids"][0]) == expected  # the exact template, character for character
    assert (
        isinstance(result.prompt, str)
        and "\n" not in result.prompt
        and result.original == "a red circle in the top left"
    )


class _Handler(BaseHTTPRequestHandler):
    calls: dict = {}

    def log_message(self, *args):
        pass

    def do_POST(self):
        mode = self.path.split("/")[1]
        _Handler.calls[mode] = _Handler.calls.get(mode, 0) + 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if mode == "slow":
            time.sleep(1.0)
        if mode == "error":
            self.send_response(500)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        if mode == "bad":
            self.wfile.write(b"{not json")
            return
        user = body["messages"][-1]["content"]
        answer = {
            "choices": [
                {"message": {"role": "assistant", "content": f'Prompt: "{user}, soft studio light, detailed"'}}
            ],
            "auth": self.headers.get("Authorization"),
        }
        self.wfile.write(json.dumps(answer).encode())


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the slow handler writes after the client timed out: a broken pipe is expected there


@pytest.fixture(scope="module")
def server():
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_server_success_uses_the_answer_and_the_key(server, monkeypatch):
    monkeypatch.setenv("KANDINSKY3_BEAUTIFY_API_KEY", "secret")
    backend = ServerLLM(f"{server}/ok", retries=0)
    assert backend.api_key == "secret"
    result = backend("a cat")
    assert result.expanded and result.prompt == "a cat, soft studio light, detailed"
    calls = _Handler.calls["ok"]
    assert backend("a cat") is result and _Handler.calls["ok"] == calls  # cached: no second request


@pytest.mark.parametrize(
    "mode,attempts,reason", [("slow", 2, "attempts"), ("error", 3, "500"), ("bad", 1, "malformed")]
)
def test_server_failures_fall_back_with_one_warning(server, mode, attempts, reason):
    backend = ServerLLM(f"{server}/{mode}", retries=attempts - 1 if mode != "bad" else 2, timeout=0.3, backoff=0.01)
    _Handler.calls[mode] = 0
    with pytest.warns(UserWarning, match="beautification") as record:
        result = backend("a dog")
    assert len(record) == 1
    assert result.prompt == "a dog" and not result.expanded and reason in result.reason
    assert _Handler.calls[mode] == attempts


def test_template_backend_fills_unstated_attributes():
    from kandinsky3.world import parse_caption

    result = TemplateBeautifier()("a star")
    parsed = parse_caption(result.prompt)
    assert result.expanded and parsed.background is not None
    (obj,) = parsed.objects
    assert obj.shape == "star" and obj.color and obj.size and obj.position
    assert TemplateBeautifier()("a star").prompt == result.prompt  # deterministic
    kept = TemplateBeautifier()("a red square in the top left").prompt
    assert kept.startswith("a ") and "red square in the top left" in kept
    assert TemplateBeautifier()("a photo of a cat").prompt == "a photo of a cat"  # nothing to fill


def test_make_beautifier():
    assert isinstance(make_beautifier("template"), TemplateBeautifier)
    assert isinstance(make_beautifier("server http://127.0.0.1:1"), ServerLLM)
    assert isinstance(make_beautifier(True), LocalLLM)
    with pytest.raises(ValueError, match="beautify must be"):
        make_beautifier("gpt")


@pytest.mark.parametrize("spec", ["gpt", "server localhost:8000", "server ", "server", "ftp://x"])
def test_a_request_refuses_what_make_beautifier_would(spec):
    """One rule (requests.parse_beautify) for the request, before loading, and the backend, after."""
    from kandinsky3 import TextToImage

    with pytest.raises(ValueError, match="beautify must be"):
        TextToImage(prompt="x", beautify=spec)
    with pytest.raises(ValueError, match="beautify must be"):
        make_beautifier(spec)
    assert TextToImage(prompt="x", beautify="").beautify == ""  # empty: no beautification, as before
    assert TextToImage(prompt="x", beautify="server http://127.0.0.1:1").beautify


def test_generation_never_fails_because_of_beautification(tiny):
    class Broken(Beautifier):
        def expand(self, prompt):
            raise ConnectionError("no model here")

    with pytest.warns(UserWarning, match="beautification"):
        image = tiny.generate("a red circle", beautify=Broken(), seed=0, steps=2, progress=False)[0]
    from kandinsky3 import read_metadata

    meta = read_metadata(image)
    assert meta["prompt"] == "a red circle" and meta["original_prompt"] == "a red circle"


def test_offline_local_llm_fails_at_once_and_generation_falls_back(monkeypatch):
    import time

    from kandinsky3.prompts import BeautifyError, LocalLLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(BeautifyError, match="out of reach"):
        LocalLLM("nobody/no-such-model")._load()
    assert time.perf_counter() - start < 10  # no retry loop against an unreachable hub
    with pytest.warns(UserWarning, match="failed, using the original prompt"):
        assert LocalLLM("nobody/no-such-model")("a star").prompt == "a star"


def test_nano_beautifies_with_its_own_template_by_default(nano):
    from kandinsky3.prompts import TemplateBeautifier

    expanded = nano.beautify("a star", True)
    assert nano.variant.beautifier == "template" and expanded.expanded
    assert expanded.prompt == TemplateBeautifier().expand("a star")
