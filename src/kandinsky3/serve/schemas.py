"""The HTTP schemas, derived from the request dataclasses of :mod:`kandinsky3.requests` (names, types, defaults,
help): a field added to a request is a field of the API, as it is an option of the CLI.

Images travel as base64 strings in the JSON body (a ``data:image/png;base64,`` prefix is accepted): one request
format for scripts, the web UI and the OpenAPI page. ``beautify`` takes only ``"template"`` on the server (the
template beautifier over the model's vocabulary: no model, no network); an LLM or a URL of the caller's choice
would let a request make the server load a model or call out.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..requests import MAX_SEED, ImageToImage, Inpaint, Outpaint, TextToImage, option


@dataclass(frozen=True, kw_only=True)
class Upscale:
    """Super-resolution of an image by the server's upscaler (:class:`kandinsky3.superres.SuperRes`)."""

    command: ClassVar[str] = "upscale"

    image: Any = field(metadata=option("input image", positional=True))
    scale: int | None = field(default=None, metadata=option("2 or 4 (default: the upscaler's)", choices=(2, 4)))
    steps: int | None = field(default=None, metadata=option("solver steps (default: the upscaler's)"))
    seed: int | None = field(default=None, metadata=option("random seed (default: random, stored in the PNG)"))

    def __post_init__(self):
        if self.scale is not None and self.scale not in (2, 4):
            raise ValueError(f"scale must be 2 or 4, got {self.scale!r}")
        steps = self.steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be a positive whole number, got {self.steps!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED}, got {self.seed!r}")

    @classmethod
    def task_fields(cls):
        return dataclasses.fields(cls)


#: task name in the API → the request dataclass it builds
TASKS: dict[str, type] = {
    "generate": TextToImage,
    "edit": ImageToImage,
    "inpaint": Inpaint,
    "outpaint": Outpaint,
    "upscale": Upscale,
}
IMAGE_FIELDS = ("image", "mask")
SERVER_EXCLUDED = ()
#: fields one task's HTTP schema leaves out: generate's IP-Adapter image prompt (``image`` and its settings) — the
#: service batches and stores generate jobs by their JSON fields and loads no image encoder; the CLI and the Python
#: API take it (``kandinsky3 generate … --image``, ``variation``, ``mix``)
TASK_EXCLUDED: dict[type, tuple[str, ...]] = {TextToImage: ("image", "image_weight", "early_boost", "early_fraction")}
#: fields whose API type is narrower than the dataclass's: the server's safe subset
SERVER_TYPES = {"beautify": (Literal["template"] | None, "expand the prompt first with the template beautifier")}
INPAINTING_TASKS = ("inpaint", "outpaint")


def _api_type(name: str, hint):
    """The JSON type of a request field: images are base64 strings, ``choices`` become enums."""
    if name in IMAGE_FIELDS:
        return str
    return hint


def _field_type(f, hint):
    t = _api_type(f.name, hint)
    choices = f.metadata.get("cli", {}).get("choices")
    if choices and f.name not in IMAGE_FIELDS:
        t = Literal[tuple(choices)]  # type: ignore[valid-type]
        if f.default is None:
            t = t | None
    return t


def api_fields(request_cls) -> list:
    skip = set(SERVER_EXCLUDED) | set(TASK_EXCLUDED.get(request_cls, ()))
    return [f for f in request_cls.task_fields() if f.name not in skip]


def body_model(task: str, request_cls) -> type[BaseModel]:
    """A pydantic model of the task's request fields, plus ``task`` (the tag) and ``model``."""
    hints = typing.get_type_hints(request_cls)
    defs: dict[str, Any] = {
        "task": (Literal[task], Field(description=f"{task}: {request_cls.__doc__.strip().splitlines()[0]}")),
        "model": (
            str | None,
            Field(default=None, description="which loaded model (GET /v1/models; default: the task's default)"),
        ),
    }
    for f in api_fields(request_cls):
        help_text = f.metadata.get("help", "")
        if f.name in IMAGE_FIELDS:
            help_text += " — base64 PNG/JPEG (a data: URL prefix is accepted)"
        default = ... if f.default is dataclasses.MISSING else f.default
        kind = _field_type(f, hints[f.name])
        if f.name in SERVER_TYPES:
            kind, help_text = SERVER_TYPES[f.name]
        defs[f.name] = (kind, Field(default=default, description=help_text))
    name = "".join(p.capitalize() for p in task.split("_")) + "Job"
    return create_model(
        name, __config__=ConfigDict(extra="forbid", strict=True, title=name), __doc__=request_cls.__doc__, **defs
    )


BODIES: dict[str, type[BaseModel]] = {task: body_model(task, cls) for task, cls in TASKS.items()}
JobBody = Annotated[Union[tuple(BODIES.values())], Field(discriminator="task")]  # noqa: UP007


class FieldError(ValueError):
    """A request field is invalid: reported as 422 with ``loc = ["body", field]``."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status


def field_of_message(message: str, names) -> str:
    """The request field a validation message is about: the first field name it mentions."""
    best, pos = "body", math.inf
    for n in names:
        m = re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", message)
        if m and m.start() < pos:
            best, pos = n, m.start()
    return best


def decode_image(name: str, text: str, max_bytes: int, max_side: int):
    """A base64 image field → (PIL image, its bytes); :class:`FieldError` naming the field on any problem."""
    from PIL import Image, UnidentifiedImageError

    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise FieldError(name, f"{name}: a data URL must be base64-encoded")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(name, f"{name} is not valid base64") from None
    if not data:
        raise FieldError(name, f"{name} is empty")
    if len(data) > max_bytes:
        raise FieldError(name, f"{name} is {len(data)} bytes; the limit is {max_bytes}", status=413)
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ("PNG", "JPEG", "WEBP"):
            raise FieldError(name, f"{name} must be a PNG, JPEG or WebP image, got {image.format}")
        if max(image.size) > max_side:
            raise FieldError(name, f"{name} is {image.width}x{image.height}; the largest side allowed is {max_side}")
        if min(image.size) < 1:
            raise FieldError(name, f"{name} is empty")
        image.load()
    except FieldError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        raise FieldError(name, f"{name} is not a readable image ({type(exc).__name__})") from None
    return image, data
