"""Reading and writing weight files safely.

safetensors first; ``.pt``/``.ckpt``/``.bin`` only through ``torch.load(weights_only=True)``, so a pickle that
carries code (or any non-tensor payload beyond plain containers) is refused. Writes go to a temporary file in
the same folder and are renamed into place, so an interrupted conversion leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A weight file is missing, unreadable, unsafe or does not fit the model."""


def load_file(path: str | os.PathLike) -> dict:
    """Load a whole weight file into a dict (tensors on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    head = _first_bytes(path)
    wrong = _not_weights(head)
    if wrong:
        raise CheckpointError(f"{path} is not a weight file: {wrong}; re-download it")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_st

        try:
            return load_st(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(
                f"{path} is not a valid safetensors file ({exc}); re-download or re-convert it"
            ) from exc
    if not (head.startswith(b"PK") or head[0] == _PICKLE_PROTOCOL):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint: it is neither a zip archive nor a pickle; re-download it"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path}: it contains Python objects other than tensors ({str(exc).splitlines()[0]}). "
            "Only plain tensor checkpoints are loaded (torch.load weights_only=True); convert it with "
            "`kandinsky3 convert` on a trusted machine, or use a .safetensors file"
        ) from exc
    except (MemoryError, OSError):  # not the file's fault: out of memory, a read error
        raise
    except Exception as exc:  # a damaged archive or pickle fails in many ways (KeyError, EOFError, BadZipFile, …)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint ({detail}); re-download it") from exc


_PICKLE_PROTOCOL = 0x80  # every torch.save file is a zip archive or a pickle of protocol ≥ 2, which starts so


def _first_bytes(path: Path, count: int = 64) -> bytes:
    with open(path, "rb") as f:
        return f.read(count)


def _not_weights(head: bytes) -> str | None:
    """Why a file starting with ``head`` holds no weights of any format (None when it may): an empty file, a Git LFS
    pointer or a saved web page are what a download gone wrong leaves."""
    if not head:
        return "the file is empty"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights (fetch them with `git lfs pull` or download the file)"
    if head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml")):
        return "it is a web page (a download that returned an error page?)"
    return None


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def tensors_only(data: Mapping, what: str) -> dict[str, torch.Tensor]:
    """Check that ``data`` is a flat mapping of names to tensors."""
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{what}: expected a state dict, found {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{what}: entries are not tensors: {bad[:5]}")
    return dict(data)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; weights and configs are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None):
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_torch(obj, path: str | os.PathLike):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_json(data: dict, path: str | os.PathLike):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"config file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc


def check_finite(tensors: Mapping[str, torch.Tensor], what: str):
    """Refuse weights holding NaN or ±inf (a diverged training run, a bad conversion), naming the first tensor."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
            raise CheckpointError(
                f"{what}: tensor {name!r} holds {bad} values; the file is damaged or comes from a diverged run — "
                "re-download it or export an earlier checkpoint"
            )


def load_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, strict: bool = True):
    """``load_state_dict`` with an error that lists what is missing, unexpected or mis-shaped, or names a tensor
    holding NaN / inf."""
    check_finite(state_dict, what)
    state_dict = _with_tied_aliases(module, state_dict)
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {shapes[:2]})")
        raise CheckpointError(f"{what} does not fit the model config: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=strict, assign=_is_meta(module))


def _with_tied_aliases(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Savers (safetensors, accelerate) keep one name of tied parameters, e.g. T5's ``shared`` and
    ``encoder.embed_tokens``: give the module's other names of the same parameter that tensor too."""
    names_of: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    filled = dict(state_dict)
    for names in names_of.values():
        present = next((n for n in names if n in filled), None)
        for name in names:
            if present is not None and name not in filled:
                filled[name] = filled[present]
    return filled


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` on the CPU, contiguous, floating-point ones cast to ``dtype`` (None: kept)."""
    tensor = tensor.detach().cpu().contiguous()
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _is_meta(module: torch.nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())
