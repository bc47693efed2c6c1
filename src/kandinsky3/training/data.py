"""Training data: the shapes world, a folder of image + caption files, or webdataset shards; and the order a run
sees it in (:class:`DataOrder`, part of every checkpoint)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from PIL import Image

from ..images import pil_to_tensor
from ..world.dataset import ShapesDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)  # centre crop, then resize
    image = image.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((size, size), Image.BICUBIC)
    return pil_to_tensor(image)[0]


class CaptionFolder(torch.utils.data.Dataset):
    """``name.png`` + ``name.txt`` pairs (a missing caption means the empty prompt)."""

    def __init__(self, root: str | Path, size: int):
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        self.size = size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else ""
        return {"image": _image_tensor(Image.open(path), self.size), "caption": caption}


class _Items(torch.utils.data.Dataset):
    def __init__(self, make, length: int):
        self.make, self.length = make, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.make(i)


def _pickled(items) -> bytes:
    # plain pickle, not the workers' shared-memory tensors: one file descriptor per tensor runs out of them
    # ("received 0 items of ancdata") on hundreds of thousands of items
    return pickle.dumps(items)


def materialise(make, length: int, num_workers: int = 0, desc: str = "rendering", chunk: int = 256) -> list:
    """``[make(0), …, make(length - 1)]``, made by ``num_workers`` processes when > 0 (the same list, in order; each
    worker makes ``chunk`` items at a time). ``make`` must be picklable for workers: a module-level function or a
    ``functools.partial`` of one."""
    from tqdm.auto import tqdm

    if num_workers == 0:
        return [make(i) for i in tqdm(range(length), desc=desc, leave=False)]
    chunks = torch.utils.data.DataLoader(
        _Items(make, length),
        batch_size=chunk,
        num_workers=num_workers,
        collate_fn=_pickled,
        generator=torch.Generator(),  # its seed draw must not consume the run's global torch stream
    )
    return [item for chunk in tqdm(chunks, desc=desc, leave=False) for item in pickle.loads(chunk)]


class InMemory(torch.utils.data.Dataset):
    """Materialise a (deterministic) dataset once: rendering costs more than a training step on a CPU.

    With ``num_workers`` the items are rendered by that many processes (the order, and so every item, is the same).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, num_workers: int = 0):
        from tqdm.auto import tqdm

        chunks = torch.utils.data.DataLoader(
            dataset, batch_size=256, num_workers=num_workers, collate_fn=torch.utils.data.default_collate
        )
        captions, tensors = [], {}
        for chunk in tqdm(chunks, desc="rendering", leave=False):
            captions += chunk.pop("caption")
            for k, v in chunk.items():
                tensors.setdefault(k, []).append(v)
        self.captions = captions
        self.tensors = {k: torch.cat(v) for k, v in tensors.items()}

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return {"caption": self.captions[i], **{k: v[i] for k, v in self.tensors.items()}}


def make_dataset(cfg, extra_sizes: tuple[int, ...] = ()) -> torch.utils.data.Dataset:
    """The dataset a ``config.DataConfig`` describes (``extra_sizes``: more render sizes of each world scene)."""
    if cfg.source == "world":
        ds = ShapesDataset(
            cfg.length, cfg.split, cfg.size, extra_sizes, cfg.object_counts, cfg.complete_captions, cfg.twins_share
        )
        return InMemory(ds, cfg.num_workers) if cfg.cache else ds
    if cfg.source == "folder":
        if not cfg.path:
            raise ValueError("data.source=folder needs data.path")
        return CaptionFolder(cfg.path, cfg.size)
    if cfg.source == "webdataset":
        try:
            import webdataset as wds
        except ImportError as exc:
            raise ImportError("data.source=webdataset needs `pip install webdataset`") from exc
        size = cfg.size
        return (
            wds.WebDataset(cfg.path, shardshuffle=True)
            .decode("pil")
            .to_tuple("jpg;png;webp", "txt")
            .map(lambda s: {"image": _image_tensor(s[0], size), "caption": s[1]})
        )
    raise ValueError(f"unknown data.source {cfg.source!r}: world, folder or webdataset")


def _int64_draw(generator: torch.Generator) -> int:
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


class DataOrder:
    """Which batches each step trains on, as state a checkpoint holds, so a resumed run continues mid-epoch with
    exactly the batches an uninterrupted one would have seen.

    Map-style datasets: each epoch starts (when its first batch is asked for) with two int64 draws from the run's
    CPU generator — the workers' base seed, then the permutation seed — as torch's ``DataLoader`` with a
    ``RandomSampler`` makes them; the permutation is cut into full batches (``drop_last``), and with ``world_size``
    processes step ``k`` gives rank ``r`` batch ``k·world_size + r`` (rank 0's seeds are broadcast). State: the
    epoch, its two seeds and the number of its batches consumed. Iterable datasets (webdataset) are read in their
    own order; a resume skips the batches already consumed in the current pass.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        collate,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        broadcast=None,
    ):
        self.dataset, self.batch_size, self.collate, self.num_workers = dataset, batch_size, collate, num_workers
        self.rank, self.world_size, self.broadcast = rank, world_size, broadcast
        self.map_style = not isinstance(dataset, torch.utils.data.IterableDataset)
        if self.map_style and self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset has {len(dataset)} items, fewer than one batch of {batch_size}"
                + (f" for each of {world_size} processes" if world_size > 1 else "")
                + ": lower batch_size or add data"
            )
        self.epoch, self.seeds, self.position = -1, None, 0
        self._batches = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size // self.world_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seeds": self.seeds, "position": self.position}

    def load_state_dict(self, state: dict):
        self.epoch, self.position = state["epoch"], state["position"]
        self.seeds = None if state["seeds"] is None else [int(s) for s in state["seeds"]]
        self._batches = None

    def _start_epoch(self, generator: torch.Generator):
        self.epoch, self.position = self.epoch + 1, 0
        if not self.map_style:
            return
        seeds = [_int64_draw(generator), _int64_draw(generator)]
        if self.world_size > 1 and self.broadcast is not None:  # every rank cuts the same permutation
            seeds = [int(s) for s in self.broadcast(torch.tensor(seeds, dtype=torch.int64)).tolist()]
        self.seeds = seeds

    def _loader(self):
        if not self.map_style:
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                drop_last=True,
                num_workers=self.num_workers,
                collate_fn=self.collate,
            )
            batches = iter(loader)
            for _ in range(self.position):  # a resume mid-pass: skip what was consumed
                next(batches)
            return batches
        base_seed, perm_seed = self.seeds
        n = len(self.dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed)).tolist()
        batches = [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n // self.batch_size)]
        mine = batches[self.rank :: self.world_size][: self.steps_per_epoch]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=mine[self.position :],
            num_workers=self.num_workers,
            collate_fn=self.collate,
            generator=torch.Generator().manual_seed(base_seed),
        )
        return iter(loader)

    def next_batch(self, generator: torch.Generator):
        """The next batch; at an epoch's end a new epoch starts, drawing its seeds from ``generator``."""
        if self._batches is None:
            if self.epoch < 0 or (self.map_style and self.position >= self.steps_per_epoch):
                self._start_epoch(generator)
            self._batches = self._loader()
        try:
            batch = next(self._batches)
        except StopIteration:
            self._batches = None
            if not self.map_style and self.position == 0:
                raise ValueError("the dataset yields no full batch") from None
            self._start_epoch(generator)
            self._batches = self._loader()
            batch = next(self._batches)
        self.position += 1
        return batch
