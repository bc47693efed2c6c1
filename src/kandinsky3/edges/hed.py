"""The HED network at the user boundary: its weights (local file or hub id, loaded safely) and its
pre/post-processing as the community annotators do it (RGB pixels in [0, 255] in; the five side outputs resized
bilinearly to the input size, averaged, sigmoid; optional safe-step quantisation)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoints.io import CheckpointError, load_file, load_into, tensors_only
from ..models.hed import HED

#: where the community annotator weights live on the Hugging Face hub
HED_HUB_REPO = "lllyasviel/Annotators"
HED_HUB_FILE = "ControlNetHED.pth"
DEFAULT_HED_WEIGHTS = f"{HED_HUB_REPO}/{HED_HUB_FILE}"


def _hub_file(spec: str, local_files_only: bool) -> Path:
    """``owner/repo/file`` or ``owner/repo`` (→ ``ControlNetHED.pth`` in it) → a local path through the hub cache."""
    parts = spec.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or HED_HUB_FILE
    try:
        from huggingface_hub import hf_hub_download

        from ..checkpoints.loading import hub_reachable

        offline = local_files_only or not hub_reachable()  # the cache only: fails at once, not after retries
        return Path(hf_hub_download(repo, filename, local_files_only=offline))
    except Exception as exc:  # offline, missing, gated: one clear message
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"could not get the HED weights {filename} from {repo} ({type(exc).__name__}: {reason}).\n"
            "Download them on a machine with internet access:\n"
            f"    hf download {repo} {filename} --local-dir ./annotators\n"
            f"then pass the file: `--hed-weights ./annotators/{filename}` (Python: hed_weights=...), "
            "or use the offline extractor (`kandinsky3 edges --method soft`, `kandinsky3 control --edges soft`)."
        ) from exc


def resolve_hed_weights(weights: str | os.PathLike | None = None, local_files_only: bool = False) -> Path:
    """A local ``.pth`` / ``.safetensors`` file, or a hub id (``owner/repo`` or ``owner/repo/file``; default
    ``lllyasviel/Annotators/ControlNetHED.pth``) → the local path of the weight file."""
    text = str(DEFAULT_HED_WEIGHTS if weights is None else weights)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidates = sorted(path.glob("ControlNetHED*.safetensors")) + sorted(path.glob("ControlNetHED*.pth"))
        if not candidates:
            raise CheckpointError(f"no ControlNetHED.pth or .safetensors file in the folder {path}")
        return candidates[0]
    parts = text.split("/")
    local_looking = text.startswith((".", "/", "~")) or len(parts) < 2 or Path(parts[0]).is_dir()
    if local_looking or not all(parts):
        raise CheckpointError(
            f"HED weights not found: {path}. Give the path of ControlNetHED.pth (or a .safetensors conversion of "
            f"it), a hub id such as {DEFAULT_HED_WEIGHTS}, or use `--method soft` (no download)"
        )
    return _hub_file(text, local_files_only)


def load_hed(weights: str | os.PathLike | None = None, device="cpu", local_files_only: bool = False) -> HED:
    """Build the HED network and load ``ControlNetHED.pth``-layout weights strictly (safetensors, or a pickle
    through ``torch.load(weights_only=True)``: a file carrying Python objects is refused)."""
    path = resolve_hed_weights(weights, local_files_only)
    data = load_file(path)
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    state = tensors_only(data, f"HED weights {path}")
    state = {k.removeprefix("module."): v.float() for k, v in state.items()}
    model = HED()
    load_into(model, state, f"HED weights {path}")
    return model.eval().requires_grad_(False).to(device)


def safe_step(edges: torch.Tensor, step: int = 2) -> torch.Tensor:
    """The annotators' 'safe' quantisation: floor(e·(step+1)) / step, clipped to [0, 1] — with step 2, values below
    ⅓ become 0, below ⅔ become ½, the rest 1. Removes faint texture edges and hides the extractor's fingerprint."""
    return (torch.floor(edges * (step + 1)) / step).clamp(0, 1)


@torch.no_grad()
def hed_edges(model: HED, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] → (B, 1, H, W) HED edge probabilities in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"HED takes RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
    param = model.norm
    pixels = images.to(device=param.device, dtype=param.dtype) * 255.0
    size = pixels.shape[-2:]
    sides = [F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in model(pixels)]
    return torch.sigmoid(torch.cat(sides, dim=1).mean(dim=1, keepdim=True)).clamp(0, 1)
