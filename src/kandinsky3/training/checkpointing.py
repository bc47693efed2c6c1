"""Checkpoints that survive being killed at any moment, and exports that never leave a half-written file.

Layout of ``OUTPUT_DIR/checkpoints``::

    step-00000500/        a complete checkpoint (never modified after it got this name)
        model.safetensors, optimizer.bin, …   accelerate's state (modules, optimizers, EMA modules, global RNGs)
        loop-0.pt         the loop's state for rank 0: step, data order, the run's generators, schedulers, logs
        checkpoint.json   the manifest, written last: step, number of processes, every file with its size
    step-00001000/
    latest                the name of the newest checkpoint (replaced atomically)
    .step-00001500.tmp/   a save in progress, or one that was killed: never read, removed by the next save

A save writes everything into the ``.tmp`` directory, fsyncs every file and the directory, renames it to its final
name (atomic), fsyncs the parent, then replaces ``latest`` through a fsynced temporary file. A checkpoint directory
therefore either does not exist under its final name or is complete; resume takes the newest one whose manifest
matches its files, whatever ``latest`` says. The newest ``keep`` checkpoints are kept; older ones are renamed away
(atomic) before they are deleted, so a half-deleted checkpoint never carries a final name either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

MANIFEST = "checkpoint.json"
POINTER = "latest"
_NAME = re.compile(r"^step-(\d+)$")


def fsync_path(path: Path):
    """fsync a file or a directory (its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path):
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def write_atomically(path: Path, text: str):
    """Replace ``path`` with ``text``: a fsynced temporary file in the same directory, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


class CheckpointStore:
    def __init__(self, root: str | Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    # -- reading ------------------------------------------------------------------------------------------------

    @staticmethod
    def step_of(path: Path) -> int | None:
        m = _NAME.match(path.name)
        return int(m.group(1)) if m else None

    @staticmethod
    def manifest(path: Path) -> dict | None:
        """The manifest of a complete checkpoint, or None if ``path`` is not one (missing, half-written, edited)."""
        try:
            manifest = json.loads((Path(path) / MANIFEST).read_text())
            files = manifest["files"]
            if manifest["step"] != CheckpointStore.step_of(Path(path)):
                return None
            for name, size in files.items():
                if (Path(path) / name).stat().st_size != size:
                    return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return manifest

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and self.step_of(p) is not None]
        return sorted((p for p in found if self.manifest(p) is not None), key=self.step_of)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (``latest`` names it after every finished save)."""
        done = self.complete()
        return done[-1] if done else None

    # -- writing ------------------------------------------------------------------------------------------------

    def save(self, accelerator, step: int, write_rank_state) -> Path:
        """Write checkpoint ``step`` on every rank (``accelerator.save_state`` plus ``write_rank_state(dir)``),
        then, on the main process, make it complete and current as the module docstring describes."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".{final.name}.tmp"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        write_rank_state(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MANIFEST).write_text(
                json.dumps({"step": step, "num_processes": accelerator.num_processes, "files": files}, indent=1)
            )
            fsync_tree(tmp)
            if final.exists() and self.manifest(final) is not None:
                shutil.rmtree(tmp)  # this step was saved complete before (and holds the same state): keep it
            else:
                if final.exists():  # a directory with a final name but no valid manifest (edited by hand)
                    self._remove(final)
                os.rename(tmp, final)
                fsync_path(self.root)
            write_atomically(self.root / POINTER, final.name + "\n")
            self.prune()
        accelerator.wait_for_everyone()
        return final

    def _remove(self, path: Path):
        trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def prune(self):
        """Keep the newest ``keep`` complete checkpoints; remove older ones and leftovers of killed saves."""
        for path in self.complete()[: -self.keep]:
            self._remove(path)
        for path in self.root.iterdir():
            if path.name.startswith((".trash-", ".step-")) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def checkpoint_weights(run_dir: str | Path) -> Path:
    """``model.safetensors`` (the first trainable module) of a run's newest complete checkpoint."""
    latest = CheckpointStore(Path(run_dir) / "checkpoints").latest()
    if latest is None:
        raise FileNotFoundError(f"{run_dir} holds no complete checkpoint (checkpoints/step-*)")
    return latest / "model.safetensors"


def export_atomically(write, export_dir: Path) -> Path:
    """Run ``write(tmp_dir)`` into a fresh directory beside ``export_dir``, fsync what it wrote, then move each
    file into ``export_dir`` with ``os.replace``: every file there is either the old one or the new one, never a
    partial write, and files the export does not write are left alone."""
    export_dir = Path(export_dir)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.export-", dir=export_dir.parent))
    try:
        write(tmp)
        fsync_tree(tmp)
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            target = export_dir / file.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
        for directory in {export_dir, *(p.parent for p in export_dir.rglob("*") if p.is_file())}:
            fsync_path(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return export_dir
