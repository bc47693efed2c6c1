"""Prompt beautification: an LLM expands a short prompt before generation (Kandinsky 3.1 used
Intel/neural-chat-7b-v3-1 with the template below).

Backends: ``LocalLLM`` (any transformers causal LM), ``ServerLLM`` (an OpenAI-compatible endpoint: vLLM,
llama.cpp server, Ollama) and ``TemplateBeautifier`` (no model: fills unstated attributes of a shapes-world
prompt). Every backend goes through ``Beautifier.__call__``: post-processing, the text encoder's token budget, a
small cache, and a fallback to the original prompt with one warning on any failure — generation never fails
because of beautification.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

from .registry import NANO_DIR
from .vocabulary import SceneVocabulary

TEMPLATE = (
    "### System:\nYou are a prompt engineer. Your mission is to expand prompts written by user. You should provide "
    "the best prompt for text to image generation in English. \n### User:\n{prompt}\n### Assistant:\n"
)
SYSTEM_PROMPT = (
    "You are a prompt engineer. Your mission is to expand prompts written by user. You should provide "
    "the best prompt for text to image generation in English. "
)
DEFAULT_LOCAL_MODEL = "Intel/neural-chat-7b-v3-1"
API_KEY_VARIABLES = ("KANDINSKY3_BEAUTIFY_API_KEY", "OPENAI_API_KEY")


class BeautifyError(RuntimeError):
    """A backend could not produce an expansion (the caller falls back to the original prompt)."""


@dataclass(frozen=True)
class Beautified:
    prompt: str  # what generation should use
    original: str
    expanded: bool  # False when the original came back (failure or nothing to add)
    truncated: bool = False
    reason: str | None = None  # why it fell back


_LABEL = re.compile(r"^\s*(?:(?:expanded|improved|enhanced|final|new)\s+)?(?:prompt|assistant|answer)\s*:\s*", re.I)


def clean_text(text: str) -> str:
    """One paragraph: cut at the next ``###`` turn, drop labels and wrapping quotes, join lines."""
    text = text.split("###")[0]
    text = _LABEL.sub("", text.strip())
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    text = text.strip().strip("\"“”'`").strip()
    return re.sub(r"\s+", " ", _LABEL.sub("", text))


def fit_tokens(text: str, tokenizer, max_tokens: int = 128) -> tuple[str, bool]:
    """Cut ``text`` at a word boundary so it fits ``max_tokens`` of ``tokenizer`` (EOS included)."""
    if tokenizer is None or len(tokenizer(text)["input_ids"]) <= max_tokens:
        return text, False
    words = text.split()
    lo, hi = 0, len(words)
    while lo < hi:  # the longest prefix of words that fits
        mid = (lo + hi + 1) // 2
        if len(tokenizer(" ".join(words[:mid]))["input_ids"]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo]), True


class Beautifier:
    """Base class: subclasses implement :meth:`expand` (raise or return ''); callers use ``beautifier(prompt)``."""

    name = "beautifier"

    def __init__(self, cache_size: int = 256):
        self._cache: OrderedDict[tuple, Beautified] = OrderedDict()
        self._cache_size = cache_size

    def expand(self, prompt: str) -> str:
        raise NotImplementedError

    def __call__(self, prompt: str, tokenizer=None, max_tokens: int = 128) -> Beautified:
        key = (prompt, max_tokens, id(tokenizer))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            text = clean_text(self.expand(prompt))
            if not text:
                raise BeautifyError("the model returned an empty answer")
            text, truncated = fit_tokens(text, tokenizer, max_tokens)
            if truncated:
                warnings.warn(f"beautified prompt cut to the text encoder's {max_tokens}-token budget", stacklevel=2)
            result = Beautified(text, prompt, text != prompt, truncated)
        except Exception as exc:  # any failure: fall back, warn once, never fail the generation
            reason = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"prompt beautification ({self.name}) failed, using the original prompt ({reason})", stacklevel=2
            )
            return Beautified(prompt, prompt, False, reason=reason)  # failures are not cached: try again next time
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result


class LocalLLM(Beautifier):
    """A ``transformers`` causal LM with the Kandinsky 3.1 template; greedy by default, sampled with a seed."""

    name = "local"

    def __init__(
        self,
        model_id: str = DEFAULT_LOCAL_MODEL,
        *,
        model=None,
        tokenizer=None,
        device: str | None = None,
        dtype=None,
        load_in_8bit: bool = False,
        max_new_tokens: int = 96,
        do_sample: bool = False,
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int | None = 0,
        cache_size: int = 256,
    ):
        super().__init__(cache_size)
        self.model_id, self._model, self._tokenizer = model_id, model, tokenizer
        self.device, self.dtype, self.load_in_8bit = device, dtype, load_in_8bit
        self.generation = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
        if do_sample:
            self.generation.update(temperature=temperature, top_p=top_p)
        self.seed = seed

    def _load(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            kwargs = {"dtype": self.dtype or (torch.float16 if torch.cuda.is_available() else torch.float32)}
            if self.load_in_8bit:
                from transformers import BitsAndBytesConfig

                kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="auto")
            local_only = not _can_download(self.model_id)
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.model_id, local_files_only=local_only)
                self._model = AutoModelForCausalLM.from_pretrained(
                    self.model_id, local_files_only=local_only, **kwargs
                ).eval()
            except OSError as exc:
                if not local_only:
                    raise
                raise BeautifyError(
                    f"the beautifier LLM {self.model_id!r} is not on this machine and the Hugging Face hub is out of "
                    "reach: use --beautify template, a server URL (--beautify http://…), or download the model first"
                ) from exc
            if not self.load_in_8bit:
                from .devices import default_device

                self._model.to(default_device(self.device))
        return self._model, self._tokenizer

    def prompt_ids(self, prompt: str):
        _, tokenizer = self._load()
        return tokenizer(TEMPLATE.format(prompt=prompt), return_tensors="pt")

    def expand(self, prompt: str) -> str:
        import torch

        model, tokenizer = self._load()
        inputs = self.prompt_ids(prompt).to(model.device)
        stop = tokenizer.convert_tokens_to_ids("###") if "###" in tokenizer.get_vocab() else None
        devices = [model.device.index or 0] if model.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):  # generate() samples from the global RNG
            if self.seed is not None:
                torch.manual_seed(self.seed)
            out = model.generate(
                **inputs,
                **self.generation,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                eos_token_id=[t for t in (tokenizer.eos_token_id, stop) if t is not None] or None,
            )
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _can_download(model_id: str, timeout: float = 2.0) -> bool:
    """Whether a hub download of ``model_id`` is possible at all: not a local folder, and the hub reachable."""
    from .checkpoints.loading import hub_reachable

    return not os.path.isdir(model_id) and hub_reachable(timeout)


class ServerLLM(Beautifier):
    """An OpenAI-compatible server: ``/v1/chat/completions`` (system + user messages) or ``/v1/completions``
    (the raw template). The API key is read from $KANDINSKY3_BEAUTIFY_API_KEY or $OPENAI_API_KEY."""

    name = "server"

    def __init__(
        self,
        base_url: str,
        model: str = DEFAULT_LOCAL_MODEL,
        *,
        endpoint: str = "chat",
        timeout: float = 30.0,
        retries: int = 2,
        backoff: float = 0.5,
        max_tokens: int = 96,
        temperature: float = 0.0,
        api_key: str | None = None,
        cache_size: int = 256,
    ):
        super().__init__(cache_size)
        if endpoint not in ("chat", "completions"):
            raise ValueError("endpoint must be 'chat' or 'completions'")
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.model, self.endpoint, self.timeout, self.retries, self.backoff = model, endpoint, timeout, retries, backoff
        self.max_tokens, self.temperature = max_tokens, temperature
        self.api_key = api_key or next((os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v)), None)

    def _request(self, prompt: str) -> tuple[str, dict]:
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature, "stop": ["###"]}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
            return f"{self.base_url}/chat/completions", body
        body["prompt"] = TEMPLATE.format(prompt=prompt)
        return f"{self.base_url}/completions", body

    def expand(self, prompt: str) -> str:
        import httpx

        url, body = self._request(prompt)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                response = httpx.post(url, json=body, headers=headers, timeout=self.timeout)
                if response.status_code >= 500 or response.status_code == 429:
                    raise BeautifyError(f"server answered {response.status_code}")
                response.raise_for_status()
                choice = response.json()["choices"][0]
                return choice["message"]["content"] if self.endpoint == "chat" else choice["text"]
            except (httpx.TimeoutException, httpx.TransportError, BeautifyError) as exc:
                last = exc  # worth another try
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise BeautifyError(f"malformed answer from {url}: {exc}") from exc
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise BeautifyError(f"{url} failed after {self.retries + 1} attempts ({last})")


class TemplateBeautifier(Beautifier):
    """No model: states every attribute of a scene prompt, filling the unstated ones deterministically (seeded by
    the prompt), e.g. "a star" → "a large yellow star in the center on a gray background".

    The words come from a :class:`~kandinsky3.vocabulary.SceneVocabulary` given as data; the default is the one
    the nano model ships (``weights/nano/vocabulary.json``, the shapes world's words)."""

    name = "template"

    def __init__(self, vocabulary: SceneVocabulary | None = None):
        super().__init__()
        self.vocabulary = vocabulary or SceneVocabulary.load(NANO_DIR / "vocabulary.json")

    def expand(self, prompt: str) -> str:
        v = self.vocabulary
        parsed = v.parse(prompt)
        if not parsed.objects:
            return prompt  # no object of the vocabulary in it: leave it alone
        rng = random.Random(int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16))
        used_colors = {o.color for o in parsed.objects if o.color}
        used_positions = {o.position for o in parsed.objects if o.position}
        phrases = []
        for o in parsed.objects:
            color = o.color or rng.choice(
                [
                    c
                    for c in v.colors
                    if c not in used_colors and c != parsed.background and (c, o.shape) not in v.excluded
                ]
            )
            used_colors.add(color)
            position = o.position or rng.choice([p for p in v.positions if p not in used_positions])
            used_positions.add(position)
            size = o.size or rng.choice(list(v.sizes))
            phrases.append(f"a {size} {color} {o.shape} {v.positions[position][0]}")
        background = parsed.background or rng.choice([b for b in v.backgrounds if b not in used_colors])
        text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        article = "an" if background[0] in "aeiou" else "a"
        return f"{text} on {article} {background} background"


def make_beautifier(spec) -> Beautifier | None:
    """``True``/"local" → LocalLLM; "template"; "server URL" or an http(s) URL → ServerLLM; a Beautifier as is."""
    if spec is None or spec is False:
        return None
    if isinstance(spec, Beautifier):
        return spec
    if spec is True:
        return LocalLLM()
    if not isinstance(spec, str):
        raise ValueError(f"beautify must be True, a backend name or URL, or a Beautifier, not {spec!r}")
    from .requests import parse_beautify

    kind, url = parse_beautify(spec)
    return {"local": LocalLLM, "template": TemplateBeautifier}[kind]() if url is None else ServerLLM(url)
