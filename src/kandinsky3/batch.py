"""Batch generation: a prompts file → one PNG per (prompt, seed) + a JSONL manifest; resumable, data-parallel.

    kandinsky3 generate --prompts prompts.txt --out-dir out --seed 0 1 2 3 --steps 50
    accelerate launch --num_processes 8 -m kandinsky3.cli generate --prompts prompts.jsonl --out-dir out

``prompts.txt``: one prompt per line (blank lines and lines starting with ``#`` are skipped). ``prompts.jsonl``: one
object per line with ``prompt`` and any other :class:`~kandinsky3.requests.TextToImage` fields (``negative_prompt``,
``steps``, ``guidance``, ``width``, …, ``seeds`` for that prompt's own seed list). Item ``(i, seed)`` is written to
``DIR/<i:06d>-<seed>.png`` (atomically) and recorded in ``DIR/manifest.rank<r>.jsonl`` (prompt, seed, settings,
file, sha256); a finished run merges the shards into ``DIR/manifest.jsonl``, ordered by item. Started again, a run
skips every item whose PNG exists with the recorded sha256. Under ``accelerate launch`` process r of n takes the
items k with k % n == r.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path


from .images import read_metadata, save_image, with_metadata
from .requests import GenerationSettings, TextToImage

MANIFEST = "manifest.jsonl"
#: TextToImage fields a batch item cannot set: the seed is the item's, one image per item, no chained steps
NOT_PER_ITEM = ("seed", "num_images", "beautify", "upscale")
#: the TextToImage fields a prompts.jsonl line (and, but for the prompt, a command-line option) may set
ITEM_FIELDS = tuple(f.name for f in TextToImage.task_fields() if f.name not in NOT_PER_ITEM)
SETTINGS = tuple(name for name in ITEM_FIELDS if name != "prompt")


@dataclasses.dataclass(frozen=True)
class Item:
    index: int  # the prompt's line among the prompts
    seed: int
    fields: dict  # TextToImage fields except the seed

    @property
    def key(self) -> str:
        return f"{self.index:06d}-{self.seed}"

    @property
    def file(self) -> str:
        return f"{self.key}.png"

    def request(self, seeds=None, prompts=None) -> TextToImage:
        """This item alone, or (``seeds``, ``prompts``: lists) a batch of items with its settings."""
        fields = {**self.fields, "seed": self.seed if seeds is None else seeds}
        if prompts is not None:
            fields["prompt"] = prompts
        return TextToImage(**fields)


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """The prompts of a .txt (one a line) or .jsonl file (one object a line) as TextToImage fields (+ ``seeds``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    names = set(ITEM_FIELDS)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or (path.suffix != ".jsonl" and line.lstrip().startswith("#")):
            continue
        if path.suffix == ".jsonl":
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
                raise ValueError(f"{path}:{n}: give an object with a string 'prompt'")
            unknown = set(entry) - names - {"seeds"}
            if unknown:
                raise ValueError(f"{path}:{n}: unknown field(s) {sorted(unknown)}; valid: {sorted(names | {'seeds'})}")
        else:
            entry = {"prompt": line.strip()}
        try:
            seeds = entry.get("seeds")
            if seeds is not None and (not isinstance(seeds, list) or not seeds):
                raise ValueError("seeds: give a non-empty list of seeds")
            for seed in seeds or [None]:
                TextToImage(**{k: v for k, v in entry.items() if k != "seeds"}, seed=seed)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{n}: {exc}") from None
        out.append(entry)
    return out


def plan(prompts: list[dict], seeds: list[int], settings: dict | None = None) -> list[Item]:
    """Every (prompt, seed) item, in order: prompt-major, then the prompt's seeds (its own ``seeds`` or ``seeds``)."""
    items = []
    for i, entry in enumerate(prompts):
        fields = {**(settings or {}), **{k: v for k, v in entry.items() if k != "seeds"}}
        for seed in entry.get("seeds") or seeds:
            items.append(Item(i, seed, fields))
    return items


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_manifests(out_dir: Path) -> dict[str, dict]:
    done = {}
    for path in sorted(out_dir.glob("manifest.rank*.jsonl")) + [out_dir / MANIFEST]:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: the item is simply redone
            done[entry["key"]] = entry
    return done


def _complete(out_dir: Path, entry: dict | None) -> bool:
    if entry is None:
        return False
    path = out_dir / entry["file"]
    return path.is_file() and _sha256(path) == entry["sha256"]


def merge_manifests(out_dir: str | os.PathLike, items: list[Item] | None = None) -> Path:
    """Write ``manifest.jsonl`` from the shards (atomically), ordered by item; only complete items."""
    out_dir = Path(out_dir)
    done = _read_manifests(out_dir)
    keys = [it.key for it in items] if items is not None else sorted(done)
    lines = [json.dumps(done[k], sort_keys=True) for k in keys if _complete(out_dir, done.get(k))]
    tmp = out_dir / f".{MANIFEST}.part"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / MANIFEST)
    return out_dir / MANIFEST


def generate_batch(
    pipe,
    prompts: str | os.PathLike | list[dict],
    out_dir: str | os.PathLike,
    seeds: list[int] = (0,),
    settings: dict | None = None,
    batch_size: int = 1,
    process_index: int = 0,
    num_processes: int = 1,
    merge: bool | None = None,
    progress: bool = True,
) -> dict:
    """Generate this process's share of the items that are not done yet. ``batch_size > 1`` runs that many items
    with equal settings as one sampler run with per-image seeds (pixels equal to the solo run up to float
    rounding; 1 is bit-exact). ``merge`` (default: when there is one process) writes ``manifest.jsonl``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = read_prompts(prompts) if not isinstance(prompts, list) else prompts
    items = plan(entries, list(seeds), settings)
    done = _read_manifests(out_dir)
    mine = [it for k, it in enumerate(items) if k % num_processes == process_index]
    todo = [it for it in mine if not _complete(out_dir, done.get(it.key))]
    redo = {it.key for it in todo}
    stale = [(it, changes) for it in mine if it.key not in redo and (changes := _changes(it, done[it.key]))]
    if stale:
        it, changes = stale[0]
        warnings.warn(
            f"{len(stale)} finished image(s) in {out_dir} were made with another prompt or settings (e.g. {it.file}: "
            + ", ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in changes.items())
            + "); they are kept as they are: use another --out-dir, or delete them, to make them anew"
        )
    shard = out_dir / f"manifest.rank{process_index}.jsonl"
    groups: list[list[Item]] = []
    for it in todo:
        if groups and len(groups[-1]) < batch_size and _same_settings(groups[-1][0], it):
            groups[-1].append(it)
        else:
            groups.append([it])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"batch (process {process_index})", unit="image")
    with open(shard, "a", encoding="utf-8") as log:
        for group in groups:
            if len(group) == 1:
                images = pipe.run(group[0].request(), progress=False)
            else:
                request = group[0].request([it.seed for it in group], [it.fields.get("prompt", "") for it in group])
                images = pipe.run(request, progress=False)
            for it, image in zip(group, images):
                meta = read_metadata(image)
                meta["index"] = 0  # as the item's solo run records it
                image = with_metadata(image, meta)
                path = out_dir / it.file
                save_image(image, path)
                settings_out = {
                    f.name: meta.get(f.name) for f in dataclasses.fields(GenerationSettings) if f.name != "seed"
                }
                entry = {"key": it.key, "index": it.index, "prompt": meta.get("prompt"), "seed": it.seed,
                         "settings": settings_out, "file": it.file, "sha256": _sha256(path)}  # fmt: skip
                log.write(json.dumps(entry, sort_keys=True) + "\n")
                log.flush()
                os.fsync(log.fileno())
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    if merge if merge is not None else num_processes == 1:
        merge_manifests(out_dir, items)
    return {"items": len(items), "mine": len(mine), "generated": len(todo), "skipped": len(mine) - len(todo)}


def _changes(item: Item, entry: dict) -> dict:
    """name → (recorded, asked) for what a finished item's manifest entry records otherwise than asked now: the
    prompt (unless beautified: the entry records the expanded one) and every explicitly asked setting."""
    recorded = {**entry.get("settings", {}), "prompt": entry.get("prompt")}
    asked = {"prompt": "", **item.fields}
    if asked.get("beautify"):
        del asked["prompt"]
    return {k: (recorded[k], v) for k, v in asked.items() if k in recorded and recorded[k] != v}


def largest_runs(items: list[Item], batch_size: int) -> list[TextToImage]:
    """For each distinct setting of the items, the largest sampler run ``generate_batch`` can make of them: up to
    ``batch_size`` items in one request (what the memory check before loading estimates)."""
    runs: list[list[Item]] = []  # items of equal settings, by ``_same_settings`` as generate_batch groups them
    for it in items:
        run = next((run for run in runs if _same_settings(run[0], it)), None)
        if run is None:
            runs.append([it])
        elif len(run) < batch_size:
            run.append(it)
    return [run[0].request([it.seed for it in run], [it.fields.get("prompt", "") for it in run]) for run in runs]


def _same_settings(a: Item, b: Item) -> bool:
    strip = lambda f: {k: v for k, v in f.items() if k != "prompt"}  # noqa: E731
    return strip(a.fields) == strip(b.fields)


def add_batch_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--prompts``, ``--out-dir``, ``--batch-size`` for ``kandinsky3 generate`` (whose ``--seed`` list and request
    options give the seeds and settings of every item)."""
    g = parser.add_argument_group("batch generation")
    g.add_argument("--prompts", default=None,
                   help="prompts.txt (one a line) or prompts.jsonl (objects): one PNG per (prompt, seed)")  # fmt: skip
    g.add_argument("--out-dir", default=None, help="folder of the PNGs and manifest.jsonl (with --prompts)")
    g.add_argument("--batch-size", type=int, default=1, help="items per sampler run (default 1: bit-exact)")
    return parser


def run_from_args(args: argparse.Namespace, load_pipeline, check=None) -> dict:
    """Run a batch described by parsed arguments (``add_batch_args`` + the request's settings); ``load_pipeline
    (device)`` builds the model; ``check(requests)``, before it, sees the largest sampler runs (``largest_runs``).
    Under ``accelerate launch`` each process takes its share on its own device."""
    if args.out_dir is None:
        raise ValueError("--prompts needs --out-dir")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise ValueError(f"--out-dir {args.out_dir} is a file; give a folder for the images and the manifest")
    if getattr(args, "prompt", None):
        raise ValueError("a prompt and --prompts FILE were both given: put the prompt in the file, or drop --prompts")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be 1 or more, got {args.batch_size}")
    seeds = args.seed if isinstance(args.seed, list) else [0 if args.seed is None else args.seed]
    settings = {k: getattr(args, k) for k in SETTINGS if getattr(args, k, None) is not None}
    if settings.get("pixel_rounding") == "truncate":
        del settings["pixel_rounding"]  # the default
    items = plan(read_prompts(args.prompts), seeds, settings)  # validated before the model loads
    if not items:
        raise ValueError(f"{args.prompts} holds no prompts (blank lines and # comments are skipped): add one a line")
    if check is not None:
        check(largest_runs(items, args.batch_size))
    rank, world, device, state = 0, 1, getattr(args, "device", None), None
    try:
        from accelerate import PartialState

        state = PartialState()
        rank, world = state.process_index, state.num_processes
        if world > 1 and device is None:
            device = str(state.device)
    except ImportError:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    summary = generate_batch(load_pipeline(device), args.prompts, args.out_dir, seeds, settings, args.batch_size,
                             rank, world, merge=False, progress=not args.no_progress)  # fmt: skip
    if state is not None:
        state.wait_for_everyone()
    if rank == 0:
        merge_manifests(args.out_dir, items)
    return {"process": rank, **summary}
