"""The GPU benchmark suite of issue #19: every performance row of the issue in one process, one JSON, one table.

    python benchmarks/gpu_suite.py --out runs/gpu_suite --time-budget 400      # H100 / H200: full-size, bf16
    python benchmarks/gpu_suite.py --smoke --out /tmp/gpu_suite                # CPU, tiny sizes, < 60 s (CI)

Full-size models are built with random weights directly on the device (meta init → ``to_empty`` → a seeded
fan-in-scaled normal init; nothing is downloaded). Sections, in the order they run (``--sections`` picks some):

  unet_step       U-Net step, batch 2 (one image with guidance), 1024² (latent 128²), 128 tokens: ours eager /
                  diffusers ``Kandinsky3UNet`` eager, same weights (our key map), max |Δ|
  movq_decode     MoVQ decode 1024² and 2048² tiled: fp32 / bf16 / bf16 + channels_last, max |Δ| vs fp32
  text_encoder    FLAN-UL2-sized T5 encoder (8.6 B, random), 128 tokens: bf16, and 8-bit when bitsandbytes imports
  pipelines       whole generation 1024²: base 50 steps + guidance, Flash 4 steps, inpainting 50 steps; batch 1, 4
  superres        KandiSuperRes 1024 → 4096: official windows (1024:800, uniform) vs whole image (time, PSNR);
                  256 → 1024
  budget16        base pipeline in the 16 GB preset: offload, 8-bit encoder if bitsandbytes, tiled decode
  unet_graph      ours replayed from a CUDA graph vs ours eager (the U-Net makes no host sync)
  pipelines_graph base and Flash 1024², batch 1, with ``cuda_graph=True`` vs eager, alternating; max |Δ| of pixels
  unet_compiled   ours torch.compile vs diffusers torch.compile (same weights as unet_step)
  movq_compiled   MoVQ decode 1024², bf16: torch.compile (default layout and channels_last) vs eager, max |Δ|
  training        nano U-Net training step (bf16 autocast, AdamW): samples/s eager vs torch.compile
  profile         torch.profiler over one eager U-Net step, a 3-step base pipeline and a MoVQ decode: the ops with
                  the most device and host time, written to profile.txt (where the sampler loop's and the
                  decode's time goes)

Every row carries its FLOPs (counted once with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device, or
composed from such counts for whole pipelines), achieved TFLOP/s and MFU against the GPU's dense bf16 peak (H100
SXM / H200: 989 TFLOP/s). Each section is independent: an error is recorded and the suite goes on; once
``--time-budget`` seconds have passed, the remaining sections are recorded as skipped. Side-by-side rows alternate
their runs (A B A B …) in this process and report medians.

``--smoke`` runs the same code paths at tiny sizes (smallest nets, 64-px images, 2 steps, fp32) on the CPU; rows that
need CUDA (graphs, bitsandbytes) or cost minutes on a CPU (torch.compile: tracing alone takes ~15 s for the tiny
U-Net here) are recorded as skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from kandinsky3.models import MoVQ, UNet, UNetConfig
from kandinsky3.models.movq import MoVQConfig
from kandinsky3.models.superres import SuperResUNetConfig
from kandinsky3.registry import VARIANTS

SECTIONS = (
    "unet_step",
    "movq_decode",
    "text_encoder",
    "pipelines",
    "superres",
    "budget16",
    "unet_graph",
    "pipelines_graph",
    "unet_compiled",
    "movq_compiled",
    "training",
    "profile",
)

# dense bf16 tensor-core peaks (TFLOP/s), matched against torch.cuda.get_device_name()
PEAKS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0), ("4090", 165.2))

PROMPT = "a red circle in the top left on a gray background"
FLAN_UL2 = dict(d_model=4096, d_ff=16384, d_kv=256, num_layers=32, num_heads=16, buckets=32, max_distance=128)
TINY_T5 = dict(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, buckets=8, max_distance=32)
# --smoke: the smallest nets of the same architectures (the U-Net one still expressible by diffusers), so the whole
# suite stays far under a minute on a shared 2-core CPU
SMOKE_UNET = UNetConfig(
    model_channels=32,
    init_channels=16,
    time_embed_dim=64,
    context_dim=32,
    groups=8,
    head_dim=16,
    dim_mult=(1, 2, 2, 2),
    num_blocks=(2, 2, 2, 2),
)
SMOKE_MOVQ = MoVQConfig(ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, num_groups=8, tile_sample_min_size=64)
SMOKE_SR = SuperResUNetConfig(
    init_channels=16, model_channels=16, time_embed_dim=32, groups=4, num_resnet_blocks=(1, 1, 1, 1)
)


@dataclass(frozen=True)
class Sizes:
    smoke: bool
    variant: str  # U-Net / MoVQ preset: base (full) or tiny
    image: int  # generation / decode side in px
    big_image: int  # tiled decode side
    tokens: int
    t5: dict
    steps: dict  # per pipeline
    batches: tuple
    sr_in: int  # KandiSuperRes input side for the 4× rows
    sr_small_in: int
    sr_window: int
    sr_stride: int
    train_batch: int
    train_steps: int
    repeats: int
    warmup: int


FULL = Sizes(
    smoke=False,
    variant="base",
    image=1024,
    big_image=2048,
    tokens=128,
    t5=FLAN_UL2,
    steps={"base": 50, "flash": 4, "inpainting": 50},
    batches=(1, 4),
    sr_in=1024,
    sr_small_in=256,
    sr_window=1024,
    sr_stride=800,
    train_batch=512,
    train_steps=20,
    repeats=5,
    warmup=1,
)
SMOKE = Sizes(
    smoke=True,
    variant="tiny",
    image=64,
    big_image=128,
    tokens=8,
    t5=TINY_T5,
    steps={"base": 2, "flash": 2, "inpainting": 2},
    batches=(1, 2),
    sr_in=24,
    sr_small_in=16,
    sr_window=64,
    sr_stride=32,
    train_batch=2,
    train_steps=1,
    repeats=1,
    warmup=0,
)


# ---------------------------------------------------------------------------------------------------------------
# helpers: init, timing, memory, FLOPs


def init_random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights in place, on whatever device the module is: fan-in-scaled normal for matrices and
    kernels, 1 for norm weights, small normal for biases. Activations stay O(1) through the full-size nets, so
    bf16 differences mean something (the zero-init official modulation would make the nets trivial)."""
    params = [p for p in module.parameters()] + [b for b in module.buffers() if b.is_floating_point()]
    device = params[0].device if params else torch.device("cpu")
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point():
                continue
            if p.dim() >= 2:
                fan_in = p[0].numel() if p.shape[0] else 1
                tmp = torch.empty(p.shape, device=device, dtype=torch.float32).normal_(0, fan_in**-0.5, generator=g)
                p.copy_(tmp)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.empty(p.shape, device=device, dtype=torch.float32).normal_(0, 0.02, generator=g))
    return module


def build_on(device, dtype, factory, seed: int) -> torch.nn.Module:
    """meta init → to_empty(device) → dtype → init_random_: a multi-billion-parameter net in seconds on a GPU, never
    more than its own size in memory."""
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device=device).to(dtype)
    init_random_(module, seed)
    return module.eval().requires_grad_(False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def side_by_side(fns: dict, device, repeats: int, warmup: int = 1) -> tuple[dict, dict]:
    """Median seconds of each callable, runs alternating A B A B … (drift hits all alike); and the last output of
    each (for the |Δ| columns, without extra runs)."""
    outs = {}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                sync(device)
                t = time.perf_counter()
                outs[k] = fn()
                sync(device)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def measure_peak(fn, device) -> dict:
    """``{'peak_gib': …}`` of one more run of ``fn`` on CUDA; off CUDA, None without running it."""
    out = {"peak_gib": None}
    if device.type == "cuda":
        with torch.no_grad(), peak_memory(device, out):
            fn()
    return out


@contextlib.contextmanager
def peak_memory(device, out: dict):
    """``out['peak_gib']``: torch.cuda.max_memory_allocated over the block, and ``out['resident_gib']``: what was
    allocated when it began (weights of the models kept in this process); None off CUDA."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        out["resident_gib"] = torch.cuda.memory_allocated() / 2**30
    yield
    if device.type == "cuda":
        sync(device)
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        out["peak_gib"] = None


def free_cuda():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def count_flops(fn) -> int | None:
    """FLOPs of ``fn()`` (run it on meta tensors: no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two images in [-1, 1]."""
    mse = ((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) / 2).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


# ---------------------------------------------------------------------------------------------------------------
# the suite


class Skip(Exception):
    """Raised inside a section or row: recorded as skipped with its message."""


class Suite:
    def __init__(self, args):
        self.args = args
        self.sizes = SMOKE if args.smoke else FULL
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are true fp32
            torch.backends.cudnn.benchmark = True
        bf16 = (self.cuda and not args.fp32) or getattr(args, "bf16", False)
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.dtype_name = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        self.repeats = args.repeats or self.sizes.repeats
        self.start = time.perf_counter()
        self.peak_tflops, self.device_name = self._peak()
        self.cache: dict = {}
        self.out = Path(args.out) if getattr(args, "out", None) else None
        self._env = None
        self.flops: dict = {}
        self.eager_unet: dict | None = None
        self.rows: list[dict] = []
        self.sections: dict = {}

    # -- environment --------------------------------------------------------------------------------------------

    def _peak(self):
        if self.args.peak_tflops:
            name = torch.cuda.get_device_name() if self.cuda else platform.processor() or "cpu"
            return self.args.peak_tflops, name
        if not self.cuda:
            return None, f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        name = torch.cuda.get_device_name()
        for key, peak in PEAKS:
            if key in name:
                return peak, name
        return None, name

    def environment(self) -> dict:
        if self._env is not None:
            return {**self._env, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
        env = {
            "device": self.device_name,
            "peak_bf16_tflops": self.peak_tflops,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "smoke": self.sizes.smoke,
            "dtype": self.dtype_name,
            "repeats": self.repeats,
            "time_budget_s": self.args.time_budget,
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        }
        from importlib.metadata import PackageNotFoundError, version

        for mod in ("diffusers", "transformers", "bitsandbytes", "triton"):  # installed versions, without importing
            try:
                env[mod] = version(mod)
            except PackageNotFoundError:
                env[mod] = "not installed"
        self._env = env
        return env

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.args.time_budget - self.elapsed() if self.args.time_budget else math.inf

    # -- rows ---------------------------------------------------------------------------------------------------

    def row(self, section, name, seconds=None, flops=None, skip=None, error=None, **extra) -> dict:
        r = {"section": section, "row": name, "seconds": seconds, "flops": flops}
        if seconds and flops:
            r["tflops"] = flops / seconds / 1e12
            r["mfu"] = r["tflops"] / self.peak_tflops if self.peak_tflops else None
        else:
            r["tflops"] = None
            r["mfu"] = None
        if r["mfu"] is None and seconds is not None:
            r["mfu_note"] = "no FLOP count" if not flops else "no bf16 peak known for this device"
        if skip:
            r["skipped"] = skip
        if error:
            r["error"] = error
        r.update(extra)
        self.rows.append(r)
        self.write()
        tag = f"SKIP ({skip})" if skip else (f"ERROR ({error})" if error else f"{seconds * 1e3:10.2f} ms")
        mfu = f"  MFU {r['mfu'] * 100:5.1f}%" if r.get("mfu") else ""
        print(f"  [{section}] {name}: {tag}{mfu}", flush=True)
        return r

    def guarded(self, section, name, fn):
        """Run one optional row; a failure becomes an error row, the section goes on."""
        try:
            return fn()
        except Skip as exc:
            return self.row(section, name, skip=str(exc))
        except Exception as exc:  # noqa: BLE001 - every failure is a result here
            tb = traceback.format_exc()
            print(tb, flush=True)
            free_cuda()
            return self.row(
                section,
                name,
                error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                traceback=tb[-2000:],
            )

    def compiled_first_call(self, section, label, make, ref):
        """Compile: ``make()`` returns the compiled zero-argument callable; its first call (the compilation) is
        timed and its output compared with ``ref``. Returns ``(fn, compile seconds, max |Δ|)``, or None when under
        ``--compile-reserve`` seconds are left or the compilation failed (the row says which)."""
        if self.left() < self.args.compile_reserve:
            self.row(section, label, skip=f"under {self.args.compile_reserve:.0f} s of the time budget left")
            return None
        result = []

        def build():
            fn = make()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fn()
            sync(self.device)
            result.append((fn, time.perf_counter() - t0, max_abs(out, ref)))
            print(f"  [{section}] {label}: compiled in {result[0][1]:.1f} s, max |Δ| vs eager {result[0][2]:.3g}")

        self.guarded(section, label, build)
        return result[0] if result else None

    # -- the run ------------------------------------------------------------------------------------------------

    def run(self, names) -> dict:
        print(f"gpu_suite on {self.device_name}, {self.dtype_name}, {'smoke' if self.sizes.smoke else 'full size'}")
        for name in dict.fromkeys(names):  # in the order asked for (the GPU minutes go to the first ones)
            info = {"status": "ok"}
            t0 = time.perf_counter()
            n_rows = len(self.rows)
            if self.left() <= 0:
                info = {"status": "skipped", "reason": f"time budget of {self.args.time_budget:.0f} s spent"}
            else:
                print(f"[{name}] ({self.elapsed():.0f} s elapsed)", flush=True)
                try:
                    getattr(self, f"section_{name}")()
                except Skip as exc:
                    info = {"status": "skipped", "reason": str(exc)}
                except Exception as exc:  # noqa: BLE001 - a failing section is recorded, the suite goes on
                    info = {
                        "status": "error",
                        "error": f"{type(exc).__name__}: {exc}"[:500],
                        "traceback": traceback.format_exc()[-3000:],
                    }
                    print(f"  [{name}] ERROR {info['error']}\n{info['traceback']}", flush=True)
                free_cuda()
            info["seconds"] = time.perf_counter() - t0
            info["rows"] = len(self.rows) - n_rows
            if info["status"] != "ok":
                print(f"  [{name}] {info['status']}: {info.get('reason') or info.get('error')}", flush=True)
            self.sections[name] = info
            self.write()
        return self.write()

    def result(self) -> dict:
        return {
            "environment": self.environment(),
            "total_seconds": self.elapsed(),
            "sections": self.sections,
            "rows": self.rows,
            "targets": targets(self.rows, self.sizes.smoke),
        }

    def write(self) -> dict:
        """results.json + results.md as they stand: written after every row and section, so a run killed at its
        wall-clock limit still leaves everything measured so far."""
        result = self.result()
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
            (self.out / "results.md").write_text(markdown(result))
        return result

    # -- shared models (built once, reused by later sections; each section can build what it needs alone) --------

    def variant(self, name: str):
        """Full-size registry variants, or their tiny stand-ins in smoke mode (tiny U-Net / MoVQ, same samplers)."""
        v = VARIANTS[name]
        if not self.sizes.smoke:
            return v
        unet = replace(SMOKE_UNET, num_channels=v.unet.num_channels)
        return replace(v, name=f"smoke-{name}", unet=unet, movq=SMOKE_MOVQ, size=self.sizes.image)

    def unet(self, kind: str = "base", dtype=None):
        kind = "base" if kind == "flash" else kind  # Flash: the base architecture (random weights either way)
        key = ("unet", kind, dtype or self.dtype)
        if key not in self.cache:
            config = self.variant(kind).unet
            seed = {"base": 1, "inpainting": 2}[kind]
            self.cache[key] = build_on(self.device, dtype or self.dtype, lambda: UNet(config), seed)
        return self.cache[key]

    def movq(self, dtype=None):
        key = ("movq", dtype or self.dtype)
        if key not in self.cache:
            config = self.variant("base").movq
            self.cache[key] = build_on(self.device, dtype or self.dtype, lambda: MoVQ(config), 3)
        return self.cache[key]

    def decode_input(self, side: int) -> torch.Tensor:
        """The latent a ``side``² image decodes from (seeded; the decode-compile and profile rows share it)."""
        config = self.variant("base").movq
        f = config.downsample_factor
        z = torch.randn(1, config.embed_dim, side // f, side // f, generator=torch.Generator().manual_seed(9))
        return z.to(self.device, self.dtype)

    def t5(self):
        key = ("t5", self.dtype)
        if key not in self.cache:
            from kandinsky3.models.text import new_t5_encoder

            c = self.sizes.t5
            self.cache[key] = build_on(
                self.device,
                self.dtype,
                lambda: new_t5_encoder(
                    32128,
                    c["d_model"],
                    c["d_ff"],
                    c["d_kv"],
                    c["num_layers"],
                    c["num_heads"],
                    c["buckets"],
                    c["max_distance"],
                ),
                4,
            )
        return self.cache[key]

    def text_encoder(self, kind: str = "base", encoder=None, device=None):
        from kandinsky3.checkpoints.loading import TINY_WORDS
        from kandinsky3.models.text import TextEncoder, build_word_tokenizer, make_projection

        device = device or self.device
        context_dim = self.variant(kind).unet.context_dim
        d_model = self.sizes.t5["d_model"]
        projection = build_on(device, self.dtype, lambda: make_projection(d_model, context_dim), 5)
        null = torch.randn(context_dim, generator=torch.Generator().manual_seed(6))
        encoder = self.t5() if encoder is None else encoder
        return TextEncoder(build_word_tokenizer(list(TINY_WORDS)), encoder, projection, null).to(device)

    def drop(self, *prefixes):
        for key in [k for k in self.cache if k[0] in prefixes]:
            del self.cache[key]
        free_cuda()

    # -- FLOP counts (meta) ----------------------------------------------------------------------------------------

    def unet_flops(self, kind: str, batch: int, latent: int, tokens: int) -> int | None:
        key = ("flops-unet", kind, batch, latent, tokens)
        if key not in self.flops:
            config = self.variant(kind).unet
            with torch.device("meta"):
                m = UNet(config)
                x = torch.empty(batch, config.num_channels, latent, latent)
                t = torch.empty(batch)
                ctx = torch.empty(batch, tokens, config.context_dim)
                mask = torch.ones(batch, tokens, dtype=torch.long)
            self.flops[key] = count_flops(lambda: m(x, t, ctx, mask))
        return self.flops[key]

    def movq_flops(self, batch: int, side: int, tiled: bool, encode: bool = False) -> int | None:
        key = ("flops-movq", batch, side, tiled, encode)
        if key not in self.flops:
            config = self.variant("base").movq
            f = config.downsample_factor
            with torch.device("meta"):
                m = MoVQ(config)
                if encode:
                    x = torch.empty(batch, 3, side, side)
                else:
                    z = torch.empty(batch, config.embed_dim, side // f, side // f)
            fn = (lambda: m.encode(x, tiled=tiled)) if encode else (lambda: m.decode(z, tiled=tiled))
            self.flops[key] = count_flops(fn)
        return self.flops[key]

    def t5_flops(self, batch: int, tokens: int) -> int | None:
        key = ("flops-t5", batch, tokens)
        if key not in self.flops:
            from kandinsky3.models.text import new_t5_encoder

            c = self.sizes.t5
            with torch.device("meta"):
                m = new_t5_encoder(
                    32128, c["d_model"], c["d_ff"], c["d_kv"], c["num_layers"], c["num_heads"], c["buckets"]
                )
                ids = torch.zeros(batch, tokens, dtype=torch.long)
            # no attention mask: transformers' mask handling calls .item(), impossible on meta; same FLOPs
            self.flops[key] = count_flops(lambda: m(input_ids=ids))
        return self.flops[key]

    # ===========================================================================================================
    # sections

    def _unet_inputs(self, config, batch, latent, tokens, dtype):
        g = torch.Generator().manual_seed(7)
        x = torch.randn(batch, config.num_channels, latent, latent, generator=g).to(self.device, dtype)
        t = torch.tensor([981.0, 500.0] * (batch // 2) + [250.0] * (batch % 2), device=self.device)
        raw = torch.randn(batch, tokens, config.context_dim, generator=g).to(self.device, dtype)
        mask = torch.ones(batch, tokens, dtype=torch.long, device=self.device)
        mask[0, tokens // 4 :] = 0  # a short prompt and a full one: the mask matters
        return x, t, raw, mask

    def _diffusers_pair(self):
        """Ours and diffusers' Kandinsky3UNet with identical weights (our key map), plus the projection diffusers
        applies inside its forward (``encoder_hid_proj``), and the step's inputs."""
        if ("pair",) in self.cache:
            return self.cache[("pair",)]
        import diffusers

        from kandinsky3.checkpoints import keymaps
        from kandinsky3.models.text import make_projection

        config = self.variant("base").unet
        ours = self.unet("base")
        proj = build_on(self.device, self.dtype, lambda: make_projection(config.context_dim, config.context_dim), 8)
        cfg = {k: v for k, v in keymaps.unet_config_to_diffusers(config).items() if not k.startswith("_")}
        with torch.device("meta"):
            theirs = diffusers.Kandinsky3UNet(**cfg)
        theirs = theirs.to_empty(device=self.device).to(self.dtype)
        sd = keymaps.unet_to_diffusers(ours.state_dict(), proj.state_dict())
        theirs.load_state_dict(sd, strict=True)
        theirs = theirs.eval().requires_grad_(False)
        latent = self.sizes.image // self.variant("base").movq.downsample_factor
        x, t, raw, mask = self._unet_inputs(config, 2, latent, self.sizes.tokens, self.dtype)
        with torch.no_grad():
            ctx = proj(raw)
        pair = (ours, theirs, x, t, raw, ctx, mask)
        self.cache[("pair",)] = pair
        return pair

    def section_unet_step(self):
        s = "unet_step"
        ours, theirs, x, t, raw, ctx, mask = self._diffusers_pair()
        latent = x.shape[-1]
        flops = self.unet_flops("base", 2, latent, self.sizes.tokens)
        params = sum(p.numel() for p in ours.parameters())

        def run_ours():
            return ours(x, t, ctx, mask)

        def run_theirs():
            return theirs(x, t, raw, mask).sample

        med, outs = side_by_side(
            {"ours": run_ours, "diffusers": run_theirs}, self.device, self.repeats, self.sizes.warmup
        )
        ref = outs["ours"]
        diff = max_abs(ref, outs["diffusers"])
        scale = ref.float().abs().max().item()
        mem_o, mem_d = measure_peak(run_ours, self.device), measure_peak(run_theirs, self.device)
        exact = self._fp32_reference(ours, x, t, ctx, mask)  # the same weights computed in fp32
        err_o, err_d = max_abs(ref, exact), max_abs(outs["diffusers"], exact)
        common = dict(batch=2, latent=latent, tokens=self.sizes.tokens, dtype=self.dtype_name, params=params)
        self.row(
            s, "diffusers Kandinsky3UNet eager", med["diffusers"], flops, max_abs_err_vs_fp32=err_d, **mem_d, **common
        )
        self.row(
            s,
            "ours eager",
            med["ours"],
            flops,
            speedup_vs_diffusers_eager=med["diffusers"] / med["ours"],
            max_abs_diff_vs_diffusers=diff,
            max_abs_output=scale,
            relative_diff=diff / scale if scale else None,
            max_abs_err_vs_fp32=err_o,
            err_ratio_vs_diffusers=err_o / err_d if err_d else None,
            **mem_o,
            **common,
        )
        self.eager_unet = med

    def _fp32_reference(self, net, x, t, ctx, mask):
        """``net``'s output computed in fp32 (TF32 off) from its own weights: the yardstick for the rounding of
        both bf16 implementations (in a 3B net, two bf16 kernel orders differ by more than one bf16 ulp)."""
        import copy

        exact = copy.deepcopy(net).float()
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.no_grad():
                return exact(x.float(), t, ctx.float(), mask).float()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            del exact
            free_cuda()

    def section_unet_graph(self):
        """Ours replayed from a CUDA graph, alternating with ours eager. A separate late section: a capture that
        fails can leave the CUDA context unusable for what follows."""
        s = "unet_graph"
        if not self.cuda:
            raise Skip("CUDA graphs need a CUDA device")
        ours, theirs, x, t, raw, ctx, mask = self._diffusers_pair()
        flops = self.unet_flops("base", 2, x.shape[-1], self.sizes.tokens)
        common = dict(batch=2, latent=x.shape[-1], tokens=self.sizes.tokens, dtype=self.dtype_name)
        with torch.no_grad():
            ref = ours(x, t, ctx, mask)
        with torch.no_grad():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    ours(x, t, ctx, mask)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = ours(x, t, ctx, mask)
        graph.replay()
        diff = max_abs(out, ref)
        again, _ = side_by_side(
            {
                "graph": graph.replay,
                "eager": lambda: ours(x, t, ctx, mask),
                "diffusers": lambda: theirs(x, t, raw, mask).sample,
            },
            self.device,
            self.repeats,
            self.sizes.warmup,
        )
        self.row(
            s,
            "ours CUDA graph",
            again["graph"],
            flops,
            speedup_vs_diffusers_eager=again["diffusers"] / again["graph"],
            speedup_vs_ours_eager=again["eager"] / again["graph"],
            max_abs_diff_vs_ours_eager=diff,
            **common,
        )

    def section_unet_compiled(self):
        """torch.compile of ours (as shipped: ``pipe.unet.compile()``; no host sync, so one graph) and of diffusers'
        U-Net. Rows alternate A B A B after compiling both."""
        s = "unet_compiled"
        if self.sizes.smoke and not self.args.smoke_compile:
            raise Skip("torch.compile on a CPU costs minutes (dynamo tracing alone ~15 s for the tiny U-Net here)")
        wanted = [v.strip() for v in self.args.compile_variants.split(",") if v.strip()]
        ours, theirs, x, t, raw, ctx, mask = self._diffusers_pair()
        flops = self.unet_flops("base", 2, x.shape[-1], self.sizes.tokens)
        mode = self.args.compile_mode
        common = dict(
            batch=2,
            latent=x.shape[-1],
            tokens=self.sizes.tokens,
            dtype=self.dtype_name,
            mode=mode,
            backend=self.args.compile_backend,
        )

        def call_ours(m):
            return m(x, t, ctx, mask)

        def call_theirs(m):
            return m(x, t, raw, mask).sample

        table = {
            "ours": (ours, call_ours, "ours compiled"),
            "diffusers": (theirs, call_theirs, "diffusers Kandinsky3UNet compiled"),
        }
        unknown = set(wanted) - set(table)
        if unknown:
            raise ValueError(f"unknown --compile-variants {sorted(unknown)}; choose from {', '.join(table)}")
        with torch.no_grad():
            ref = ours(x, t, ctx, mask)
        compiled, compile_s, diffs = {}, {}, {}
        for name in wanted:
            model, call, label = table[name]

            def make(model=model, call=call):
                c = torch.compile(model, mode=mode, backend=self.args.compile_backend)
                return lambda: call(c)

            built = self.compiled_first_call(s, label, make, ref)
            if built is not None:
                compiled[name], compile_s[name], diffs[name] = built
        if not compiled:
            return
        med, _ = side_by_side(compiled, self.device, self.repeats, warmup=2)
        eager = self.eager_unet or {}
        for name in compiled:
            extra = {}
            if "diffusers" in med and name != "diffusers":
                extra["speedup_vs_diffusers_compiled"] = med["diffusers"] / med[name]
            if "diffusers" in eager:
                extra["speedup_vs_diffusers_eager"] = eager["diffusers"] / med[name]
            if "ours" in eager:
                extra["speedup_vs_ours_eager"] = eager["ours"] / med[name]
            self.row(
                s,
                table[name][2],
                med[name],
                flops,
                compile_s=compile_s[name],
                max_abs_diff_vs_ours_eager=diffs[name],
                **extra,
                **common,
            )

    def section_movq_decode(self):
        s = "movq_decode"
        config = self.variant("base").movq
        f = config.downsample_factor
        ref_model = self.movq(torch.float32)
        variants = {
            "fp32": (torch.float32, torch.contiguous_format),
            "bf16": (torch.bfloat16, torch.contiguous_format),
            "bf16 + channels_last": (torch.bfloat16, torch.channels_last),
        }
        models = {"fp32": ref_model}
        for name, (dtype, fmt) in variants.items():
            if name == "fp32":
                continue
            m = build_on(self.device, dtype, lambda: MoVQ(config), 3).to(memory_format=fmt)
            m.load_state_dict(ref_model.state_dict())
            models[name] = m
        g = torch.Generator().manual_seed(9)
        for side, tiled in ((self.sizes.image, False), (self.sizes.big_image, True)):
            z = torch.randn(1, config.embed_dim, side // f, side // f, generator=g).to(self.device)
            flops = self.movq_flops(1, side, tiled)
            fns, inputs = {}, {}
            for name, (dtype, fmt) in variants.items():
                inputs[name] = z.to(dtype).contiguous(memory_format=fmt)
                fns[name] = lambda m=models[name], zz=inputs[name]: m.decode(zz, tiled=tiled)
            repeats = self.repeats if side == self.sizes.image else max(1, self.repeats // 3)
            med, outs = side_by_side(fns, self.device, repeats, self.sizes.warmup)
            ref = outs["fp32"]
            scale = ref.abs().max().item()
            for name in fns:
                mem = measure_peak(fns[name], self.device)
                self.row(
                    s,
                    f"{side}² {'tiled' if tiled else 'whole'} {name}",
                    med[name],
                    flops,
                    speedup_vs_fp32=med["fp32"] / med[name],
                    max_abs_diff_vs_fp32=0.0 if name == "fp32" else max_abs(outs[name], ref),
                    max_abs_output=scale,
                    note="fp32 = PyTorch defaults (cuDNN convolutions in TF32)"
                    if name == "fp32" and self.cuda
                    else None,
                    **mem,
                )
            del ref, outs
        del models
        if self.dtype != torch.float32:
            del self.cache[("movq", torch.float32)]

    def section_movq_compiled(self):
        """The image-size decode under torch.compile, in the default layout and in channels_last, against eager,
        alternating: the decoder is convolutions with GroupNorm and SiLU between them (memory-bound kernels that
        compile fuses). On the H200 eager bf16 ran at 12 % of peak (the target, 70 ms, needs 49 %), and eager
        channels_last was slower still (443 against 295 ms) — its convolutions are cuDNN's fast NHWC ones, so the
        suspects are the ops between them, which compile replaces with its own kernels in either layout."""
        s = "movq_compiled"
        if self.sizes.smoke and not self.args.smoke_compile:
            raise Skip("torch.compile on a CPU costs minutes (dynamo tracing alone ~15 s for the tiny U-Net here)")
        m, side = self.movq(), self.sizes.image
        z = self.decode_input(side)
        with torch.no_grad():
            ref = m.decode(z, tiled=False)
        layouts = {"compiled": torch.contiguous_format, "compiled + channels_last": torch.channels_last}
        fns, compile_s, diffs = {"eager": lambda: m.decode(z, tiled=False)}, {}, {}
        for name, fmt in layouts.items():

            def make(fmt=fmt):
                model = copy.deepcopy(m).to(memory_format=fmt) if fmt is torch.channels_last else m
                zz = z.contiguous(memory_format=fmt)
                decode = torch.compile(  # static shapes and strides: the second layout's compile of this same
                    lambda x: model.decode(x, tiled=False),  # lambda would otherwise mark its strides dynamic
                    mode=self.args.compile_mode,
                    backend=self.args.compile_backend,
                    dynamic=False,
                )
                return lambda: decode(zz)

            built = self.compiled_first_call(s, f"{side}² whole {self.dtype_name} {name}", make, ref)
            if built is not None:
                fns[name], compile_s[name], diffs[name] = built
        if len(fns) == 1:
            return
        with torch.no_grad():
            med, _ = side_by_side(fns, self.device, self.repeats, 2)
        for name in layouts:
            if name in fns:
                self.row(
                    s,
                    f"{side}² whole {self.dtype_name} {name}",
                    med[name],
                    self.movq_flops(1, side, False),
                    speedup_vs_eager=med["eager"] / med[name],
                    eager_seconds=med["eager"],
                    compile_s=compile_s[name],
                    max_abs_diff_vs_eager=diffs[name],
                    mode=self.args.compile_mode,
                )

    def section_text_encoder(self):
        s = "text_encoder"
        tokens = 128 if not self.sizes.smoke else self.sizes.tokens
        enc = self.t5()
        ids = torch.randint(2, 32000, (1, tokens), generator=torch.Generator().manual_seed(10)).to(self.device)
        mask = torch.ones(1, tokens, dtype=torch.long, device=self.device)
        params = sum(p.numel() for p in enc.parameters())
        flops = self.t5_flops(1, tokens)

        def run():
            return enc(input_ids=ids, attention_mask=mask).last_hidden_state

        med, outs = side_by_side({"a": run}, self.device, self.repeats, 2 * self.sizes.warmup)
        ref = outs["a"]
        mem = measure_peak(run, self.device)
        self.row(s, f"T5 encoder {self.dtype_name}", med["a"], flops, params=params, tokens=tokens, **mem)
        self.guarded(s, "T5 encoder streamed", lambda: self._t5_streamed(s, enc, ids, mask, ref, flops, tokens))
        self.guarded(s, "T5 encoder 8-bit (bitsandbytes)", lambda: self._t5_8bit(s, enc, run, ref, flops, tokens))

    def _t5_streamed(self, s, enc, ids, mask, ref, flops, tokens):
        """The memory="16gb" preset's encoder: weights in pinned CPU memory, one block at a time on the device
        (``kandinsky3.offload.streamed``); the first run pins the masters and is not timed."""
        import copy

        from kandinsky3.offload import streamed

        cpu = copy.deepcopy(enc).to("cpu")
        free_cuda()
        try:

            def run_streamed():
                with streamed(cpu, self.device):
                    return cpu(input_ids=ids, attention_mask=mask).last_hidden_state

            med, outs = side_by_side({"s": run_streamed}, self.device, self.repeats, max(1, self.sizes.warmup))
            mem = measure_peak(run_streamed, self.device)
            return self.row(
                s,
                f"T5 encoder {self.dtype_name} streamed from the CPU, one block at a time",
                med["s"],
                flops,
                max_abs_diff_vs_resident=max_abs(outs["s"], ref),
                weights_gib=sum(p.numel() * p.element_size() for p in cpu.parameters()) / 2**30,
                tokens=tokens,
                **mem,
            )
        finally:
            free_cuda()  # (the CPU copy goes with this frame)

    def _t5_8bit(self, s, enc, run, ref, flops, tokens):
        why = bnb_unavailable(self.device)
        if why:
            raise Skip(why)
        import copy

        q = quantize_8bit(copy.deepcopy(enc), self.device)
        try:
            ids = torch.randint(2, 32000, (1, tokens), generator=torch.Generator().manual_seed(10)).to(self.device)
            mask = torch.ones(1, tokens, dtype=torch.long, device=self.device)

            def run8():
                return q(input_ids=ids, attention_mask=mask).last_hidden_state

            med, outs = side_by_side({"q": run8}, self.device, self.repeats, 2 * self.sizes.warmup)
            out = outs["q"]
            mem = measure_peak(run8, self.device)
            weights = torch.cuda.memory_allocated() / 2**30
            rel = max_abs(out, ref) / max(ref.float().abs().max().item(), 1e-9)
            return self.row(
                s,
                "T5 encoder 8-bit (bitsandbytes)",
                med["q"],
                flops,
                relative_diff_vs_unquantized=rel,
                allocated_gib=weights,
                tokens=tokens,
                **mem,
            )
        finally:
            free_cuda()

    # -- whole pipelines ------------------------------------------------------------------------------------------

    def pipeline(self, kind: str, offload=False, movq_tiling=False, text_encoder=None, device=None, cuda_graph=False):
        from kandinsky3 import Kandinsky3
        from kandinsky3.checkpoints import Components

        v = self.variant(kind)
        te = text_encoder or self.text_encoder(kind)
        return Kandinsky3(
            Components(v, self.unet(kind), self.movq(), te),
            device=device or self.device,
            offload=offload,
            movq_tiling=movq_tiling,
            cuda_graph=cuda_graph,
        )

    def _pipeline_flops(self, kind, batch, steps, guided, tokens, inpaint=False, tiled=False) -> int | None:
        side = self.sizes.image
        latent = side // self.variant("base").movq.downsample_factor
        unet_batch = batch * (2 if guided else 1)
        # the prompt is encoded once (padded to 128 ids) and repeated; the unconditional branch is the null embedding
        total = self.t5_flops(1, 128 if not self.sizes.smoke else self.sizes.tokens)
        total += steps * self.unet_flops(kind, unet_batch, latent, tokens)
        total += self.movq_flops(batch, side, tiled)
        if inpaint:
            total += self.movq_flops(1, side, tiled, encode=True)
        return total

    def _run_pipeline(self, pipe, kind, batch, steps):
        side = self.sizes.image
        if kind == "inpainting":
            from PIL import Image

            image = Image.new("RGB", (side, side), (128, 100, 90))
            mask = Image.new("L", (side, side), 0)
            mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
            return pipe.inpaint(image, mask, PROMPT, steps=steps, num_images=batch, seed=0, progress=False)
        return pipe.generate(PROMPT, steps=steps, num_images=batch, width=side, height=side, seed=0, progress=False)

    def section_pipelines(self):
        s = "pipelines"
        self.drop("pair")  # peak memory: the pipeline's own models only (T5, one U-Net, MoVQ)
        tokens = len(self.text_encoder("base").tokenize([PROMPT])[1].nonzero()) + 1
        for kind in ("base", "flash", "inpainting"):

            def one(kind=kind):
                if kind == "inpainting":
                    self.drop("unet")
                pipe = self.pipeline(kind)
                steps = self.sizes.steps[kind]
                guided = kind != "flash"
                if self.sizes.warmup:
                    with torch.no_grad():
                        self._run_pipeline(pipe, kind, 1, min(steps, 2))  # warm-up (kernels, cudnn autotune)
                for batch in self.sizes.batches:
                    repeats = max(1, min(self.repeats, 3 if batch == 1 else 2))
                    mem = {}
                    times = []
                    with torch.no_grad(), peak_memory(self.device, mem):
                        for _ in range(repeats):
                            times.append(clock(lambda: self._run_pipeline(pipe, kind, batch, steps), self.device))
                    seconds = statistics.median(times)
                    flops = self._pipeline_flops(kind, batch, steps, guided, tokens, inpaint=kind == "inpainting")
                    self.row(
                        s,
                        f"{kind} {self.sizes.image}² {steps} steps{' + guidance' if guided else ''}, batch {batch}",
                        seconds,
                        flops,
                        seconds_per_image=seconds / batch,
                        images=batch,
                        steps=steps,
                        context_tokens=tokens,
                        **mem,
                    )
                if kind == "inpainting":
                    self.drop("unet")

            self.guarded(s, f"{kind} pipeline", one)

    def section_pipelines_graph(self):
        """Base and Flash with the U-Net step replayed from CUDA graphs (``Kandinsky3(..., cuda_graph=True)``),
        alternating with the same pipeline eager; the first graphed run (the capture) is the warm-up."""
        s = "pipelines_graph"
        if not self.cuda:
            raise Skip("CUDA graphs need a CUDA device")
        self.drop("pair")
        tokens = len(self.text_encoder("base").tokenize([PROMPT])[1].nonzero()) + 1
        for kind in ("base", "flash"):

            def one(kind=kind):
                eager, graphed = self.pipeline(kind), self.pipeline(kind, cuda_graph=True)
                steps = self.sizes.steps[kind]
                with torch.no_grad():
                    med, outs = side_by_side(
                        {
                            "graph": lambda: self._run_pipeline(graphed, kind, 1, steps),
                            "eager": lambda: self._run_pipeline(eager, kind, 1, steps),
                        },
                        self.device,
                        max(1, min(self.repeats, 3)),
                        max(1, self.sizes.warmup),
                    )
                from kandinsky3.images import pil_to_tensor

                diff = max_abs(pil_to_tensor(outs["graph"][0]), pil_to_tensor(outs["eager"][0])) * 127.5
                guided = kind != "flash"
                flops = self._pipeline_flops(kind, 1, steps, guided, tokens)
                return self.row(
                    s,
                    f"{kind} {self.sizes.image}² {steps} steps{' + guidance' if guided else ''}, batch 1, CUDA graph",
                    med["graph"],
                    flops,
                    speedup_vs_eager=med["eager"] / med["graph"],
                    eager_seconds=med["eager"],
                    max_abs_diff_levels=diff,
                )

            self.guarded(s, f"{kind} pipeline, CUDA graph", one)

    # -- KandiSuperRes --------------------------------------------------------------------------------------------

    def section_superres(self):
        from kandinsky3.diffusion.tiling import get_views
        from kandinsky3.images import pil_to_tensor
        from kandinsky3.models.superres import SuperResUNet, SuperResUNetConfig
        from kandinsky3.superres import SuperRes

        s = "superres"
        self.cache.clear()  # peak memory: the upscaler alone
        free_cuda()
        if self.sizes.smoke:
            config = SMOKE_SR
        else:
            config = SuperResUNetConfig()
        unet = build_on(self.device, self.dtype, lambda: SuperResUNet(config), 11)
        sr = SuperRes(
            unet,
            scale=4,
            device=self.device,
            name="random",
            window=self.sizes.sr_window,
            stride=self.sizes.sr_stride,
            blend="uniform",
        )
        steps = sr.steps

        def image(side):
            from PIL import Image

            y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
            rgb = torch.stack([x, y, 1 - (x + y) / 2], -1).mul(255).byte().numpy()
            return Image.fromarray(rgb)

        def window_flops(side):
            with torch.device("meta"):
                m = SuperResUNet(config)
                args = (torch.empty(1, 3, side, side), torch.empty(1), torch.empty(1, 3, side, side))
            return count_flops(lambda: m(*args))

        sr_params = sum(p.numel() for p in unet.parameters())
        references = {}
        official = (self.sizes.sr_window, self.sizes.sr_stride)
        # the whole 4K image last, timed once with no warm-up: on 2026-12-04 (H200) it outlasted the call's limit
        for src, window, stride in (
            (self.sizes.sr_in, *official),
            (self.sizes.sr_small_in, *official),
            (self.sizes.sr_in, 0, 0),
        ):
            lr = image(src)
            out_side = src * 4
            whole = not window
            if whole and not self.sizes.smoke and self.left() < 120:
                self.row(s, f"{src} → {out_side} whole image", skip="under 120 s of the time budget left")
                continue
            views = len(get_views(out_side, out_side, window, stride)) if window else 1
            flops = steps * (views * window_flops(window) if window else window_flops(out_side))

            def run(window=window, stride=stride):
                return sr.upscale(lr, 4, seed=0, window=window, stride=stride, blend="uniform", progress=False)

            def one(window=window, stride=stride, views=views, flops=flops, run=run, src=src, whole=whole):
                repeats = 1 if whole else max(1, min(self.repeats, 2))
                with torch.no_grad():
                    if self.sizes.warmup and not whole:
                        run()  # warm-up (cudnn autotune for each view-batch shape)
                    mem = {}
                    times = []
                    with peak_memory(self.device, mem):
                        for _ in range(repeats):
                            sync(self.device)
                            t0 = time.perf_counter()
                            image = run()
                            sync(self.device)
                            times.append(time.perf_counter() - t0)
                    out = pil_to_tensor(image)
                extra = {}
                if src not in references:
                    references[src] = out
                else:
                    extra["psnr_vs_official_tiling_db"] = psnr(out, references[src])
                name = f"{src} → {out_side} " + (
                    f"windows {window}:{stride} ({views} views)" if window else "whole image"
                )
                return self.row(
                    s,
                    name,
                    statistics.median(times),
                    flops,
                    views=views,
                    steps=steps,
                    params=sr_params,
                    **extra,
                    **mem,
                )

            self.guarded(s, f"{src} → {out_side} {window}:{stride}", one)

    # -- where the time goes ----------------------------------------------------------------------------------------

    def section_profile(self):
        """One eager U-Net step (batch 2), a 3-step base pipeline (batch 1) and one eager MoVQ decode of the image
        size (the H200's 295 ms against the 70 ms target: which kernels hold it) under ``torch.profiler``: per op,
        the device time and the host time; the tables go to ``profile.txt``, a summary row per run to the results."""
        from torch.profiler import ProfilerActivity, profile

        s = "profile"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        device_key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        ours, _theirs, x, t, _raw, ctx, mask = self._diffusers_pair()
        pipe = self.pipeline("base")
        movq, side = self.movq(), self.sizes.image
        z = self.decode_input(side)
        runs = {
            "U-Net step, batch 2": lambda: ours(x, t, ctx, mask),
            "base pipeline, 3 steps + guidance, batch 1": lambda: self._run_pipeline(pipe, "base", 1, 3),
            f"MoVQ decode {side}², whole": lambda: movq.decode(z, tiled=False),
        }
        texts = []
        for name, fn in runs.items():
            with torch.no_grad():
                fn()  # warm-up
                sync(self.device)
                wall = time.perf_counter()
                with profile(activities=activities) as prof:
                    fn()
                    sync(self.device)
                wall = time.perf_counter() - wall
            events = prof.key_averages()
            # device time: the kernel rows only (an op's row repeats its kernels' time), as torch's own table sums
            kernel_rows = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            device_us = sum(e.self_device_time_total for e in kernel_rows)
            kernels = sum(e.count for e in kernel_rows) if self.cuda else None
            texts += [f"## {name}: {wall * 1e3:.1f} ms wall under the profiler", ""]
            for key in ([device_key] if self.cuda else []) + ["self_cpu_time_total"]:
                texts += [f"### by {key}", events.table(sort_by=key, row_limit=25, max_name_column_width=70), ""]
            self.row(
                s,
                name,
                wall,
                None,
                device_busy_ms=device_us / 1e3 if self.cuda else None,
                device_busy_share=device_us / 1e6 / wall if self.cuda and wall else None,
                kernel_launches=kernels,
            )
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "profile.txt").write_text("\n".join(texts))

    # -- the 16 GB preset -----------------------------------------------------------------------------------------

    def section_budget16(self):
        """The base pipeline in the ``memory="16gb"`` preset of ``Kandinsky3.from_pretrained``: bf16 U-Net and MoVQ
        resident, the bf16 T5 kept in (pinned) CPU memory and streamed to the GPU one block at a time while it
        encodes, MoVQ decode tiled. Every other model of the suite is dropped first, so max_memory_allocated is
        this pipeline's alone. One untimed warm-up run (it pins the encoder's masters), then the timed runs."""
        s = "budget16"
        from kandinsky3 import Kandinsky3
        from kandinsky3.checkpoints import Components
        from kandinsky3.pipeline import MEMORY_PRESETS

        preset = MEMORY_PRESETS["16gb"](self.device)
        unet = self.unet("base")
        movq = self.movq()
        enc = self.t5()
        self.cache.clear()
        free_cuda()
        te = self.text_encoder("base", encoder=enc.to("cpu"), device=torch.device("cpu"))
        del enc
        free_cuda()
        pipe = Kandinsky3(
            Components(self.variant("base"), unet, movq, te),
            device=self.device,
            offload=preset["offload"],
            movq_tiling=preset["movq_tiling"],
            stream_text_encoder=preset["stream_text_encoder"],
        )
        baseline = torch.cuda.memory_allocated() / 2**30 if self.cuda else None
        steps = self.sizes.steps["base"]
        with torch.no_grad():
            self._run_pipeline(pipe, "base", 1, min(steps, 2))  # warm-up: pins the T5 masters, cudnn autotune

            def encode():
                with pipe.placed(te):
                    return te.encode([PROMPT], None)[0]

            encode_seconds = statistics.median(clock(encode, self.device) for _ in range(max(1, self.repeats // 2)))
        mem = {}
        times = []
        with torch.no_grad(), peak_memory(self.device, mem):
            for _ in range(max(1, min(self.repeats, 2))):
                times.append(clock(lambda: self._run_pipeline(pipe, "base", 1, steps), self.device))
        tokens = len(te.tokenize([PROMPT])[1].nonzero()) + 1
        flops = self._pipeline_flops("base", 1, steps, True, tokens, tiled=True)
        peak = mem["peak_gib"]
        self.row(
            s,
            f"base {self.sizes.image}² {steps} steps + guidance, batch 1, 16 GB preset",
            statistics.median(times),
            flops,
            baseline_gib=baseline,
            target_peak_gib=15.0,
            meets_target=None if peak is None else peak <= 15.0,
            streamed_encode_seconds=encode_seconds,
            note="T5 bf16 streamed from pinned CPU memory; U-Net, MoVQ bf16 resident; tiled decode"
            + ("" if self.cuda else "; peak memory is a CUDA figure (the CPU run checks the code path)"),
            **mem,
        )

    # -- training throughput ----------------------------------------------------------------------------------------

    def section_training(self):
        """A nano diffusion training step (ε-prediction MSE, AdamW, bf16 autocast on CUDA) on synthetic latents:
        the GPU side of ``kandinsky3 train diffusion`` without its data rendering. Eager vs torch.compile."""
        s = "training"
        config = SMOKE_UNET if self.sizes.smoke else VARIANTS["nano"].unet
        batch, steps = self.sizes.train_batch, self.sizes.train_steps
        latent, tokens = 8, 16
        g = torch.Generator().manual_seed(12)
        x0 = torch.randn(batch, 4, latent, latent, generator=g).to(self.device)
        noise = torch.randn(batch, 4, latent, latent, generator=g).to(self.device)
        tt = torch.randint(0, 1000, (batch,), generator=g).to(self.device)
        ab = torch.cos(tt.float() / 1000 * math.pi / 2).pow(2)[:, None, None, None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        ctx = torch.randn(batch, tokens, config.context_dim, generator=g).to(self.device)
        mask = torch.ones(batch, tokens, dtype=torch.long, device=self.device)
        mask[: batch // 2, tokens // 2 :] = 0

        with torch.device("meta"):
            meta = UNet(config)
            args = (
                torch.empty(batch, 4, latent, latent),
                torch.empty(batch),
                torch.empty(batch, tokens, config.context_dim),
                torch.ones(batch, tokens, dtype=torch.long),
            )
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            meta(*args).float().pow(2).mean().backward()
        flops = int(counter.get_total_flops())

        def make(compiled: bool):
            torch.manual_seed(0)
            model = UNet(config).to(self.device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=self.cuda)
            fwd = (
                torch.compile(model, mode=self.args.compile_mode, backend=self.args.compile_backend)
                if compiled
                else model
            )
            amp = torch.autocast("cuda", torch.bfloat16) if self.cuda else contextlib.nullcontext()

            def step():
                with amp:
                    eps = fwd(x_t, tt.float(), ctx, mask)
                loss = F.mse_loss(eps.float(), noise)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            return step

        results = {}
        for compiled in (False, True):
            name = "compiled" if compiled else "eager"

            def one(compiled=compiled, name=name):
                if compiled and self.sizes.smoke and not self.args.smoke_compile:
                    raise Skip("torch.compile on a CPU costs minutes (dynamo tracing alone ~15 s for a tiny U-Net)")
                if compiled and self.left() < self.args.compile_reserve:
                    raise Skip(f"under {self.args.compile_reserve:.0f} s of the time budget left")
                step = make(compiled)
                t0 = time.perf_counter()
                for _ in range(3 if not self.sizes.smoke else 1):  # warm-up (compilation, autotune)
                    step()
                sync(self.device)
                warm = time.perf_counter() - t0
                mem = {}
                with peak_memory(self.device, mem):
                    seconds = clock(lambda: [step() for _ in range(steps)], self.device) / steps
                results[name] = seconds
                extra = {"speedup_vs_eager": results["eager"] / seconds} if compiled and "eager" in results else {}
                return self.row(
                    s,
                    f"nano training step {name}, batch {batch}",
                    seconds,
                    flops,
                    samples_per_s=batch / seconds,
                    warmup_s=warm,
                    batch=batch,
                    **extra,
                    **mem,
                )

            self.guarded(s, f"nano training step {name}", one)


def bnb_unavailable(device) -> str | None:
    """None when bitsandbytes' int8 linear imports and runs on ``device``; else why not (checked on one small layer,
    so a broken install never leaves a half-quantised encoder behind)."""
    if device.type != "cuda":
        return "bitsandbytes int8 needs a CUDA device"
    try:
        probe = quantize_8bit(torch.nn.Sequential(torch.nn.Linear(64, 64)).to(device, torch.bfloat16), device)
        with torch.no_grad():
            probe(torch.randn(4, 64, device=device, dtype=torch.bfloat16)).float().sum().item()
    except Exception as exc:  # noqa: BLE001 - any failure means: no 8-bit rows
        return (
            f"bitsandbytes unusable here ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
        )
    return None


def quantize_8bit(encoder: torch.nn.Module, device) -> torch.nn.Module:
    """Replace the ``nn.Linear`` layers of a (random, bf16) T5 encoder by bitsandbytes ``Linear8bitLt`` (LLM.int8,
    threshold 6), quantised on ``device``, as ``load_in_8bit=True`` does — which keeps T5's ``wo`` (the FF output)
    out of int8 (``T5PreTrainedModel._keep_in_fp32_modules``: LLM.int8 computes in fp16 and T5's FF output overflows
    it; on 2026-12-04 quantising ``wo`` too gave a relative error of 1.33). The source weights are moved out."""
    import bitsandbytes as bnb

    parents = [m for m in encoder.modules() if any(isinstance(c, torch.nn.Linear) for c in m.children())]
    for parent in parents:  # (holding parents, not the old layers, frees each bf16 weight once it is replaced)
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "wo":
                q = bnb.nn.Linear8bitLt(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    has_fp16_weights=False,
                    threshold=6.0,
                )
                q.weight = bnb.nn.Int8Params(
                    child.weight.data.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False
                )
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.to("cpu", torch.float16), requires_grad=False)
                setattr(parent, name, q.to(device))
                del child
    free_cuda()
    return encoder.to(device)


# ---------------------------------------------------------------------------------------------------------------
# output


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def targets(rows: list[dict], smoke: bool = False) -> list[dict]:
    """Issue #19's targets, read off the rows: (target, measured, met). ``measured`` None = row missing; ``met``
    None in a smoke run (tiny sizes: the lookup is exercised, the limits do not apply)."""

    def find(section, test):
        for r in rows:
            if r["section"] == section and not r.get("skipped") and not r.get("error") and test(r["row"]):
                return r
        return None

    def check(name, value, limit, higher_is_better, unit):
        met = None if value is None or smoke else (value >= limit if higher_is_better else value <= limit)
        return {"target": name, "measured": value, "limit": limit, "unit": unit, "met": met}

    ours = find("unet_step", lambda n: n == "ours eager")
    graph = find("unet_graph", lambda n: n == "ours CUDA graph")
    best_eager = max(
        [r["speedup_vs_diffusers_eager"] for r in (ours, graph) if r and "speedup_vs_diffusers_eager" in r],
        default=None,
    )
    compiled = [r for r in rows if r["section"] == "unet_compiled" and "speedup_vs_diffusers_compiled" in r]
    best_compiled = max((r["speedup_vs_diffusers_compiled"] for r in compiled), default=None)

    def fastest(kind):  # eager or with the U-Net step replayed from CUDA graphs, whichever is faster
        found = [
            find("pipelines", lambda n: n.startswith(kind) and n.endswith("batch 1")),
            find("pipelines_graph", lambda n: n.startswith(kind)),
        ]
        return min((r for r in found if r), key=lambda r: r["seconds"], default=None)

    base, flash = fastest("base"), fastest("flash")
    movq = [
        r["seconds"]
        for r in rows
        if r["section"] in ("movq_decode", "movq_compiled") and "whole" in r["row"] and r.get("seconds")
    ]
    sr = find("superres", lambda n: "windows" in n and "(25 views)" in n) or find(
        "superres", lambda n: "windows" in n and "→" in n and int(n.split("→")[1].split()[0]) >= 4096
    )
    b16 = find("budget16", lambda n: True)
    out = [
        check(
            "U-Net step, best of ours eager / CUDA graph vs diffusers eager (≥ 1.3×, goal 2×)",
            best_eager,
            1.3,
            True,
            "×",
        ),
        check("U-Net step, best ours compiled vs diffusers compiled", best_compiled, 1.0, True, "×"),
        check(
            "U-Net bf16 max |Δ| to the fp32 reference: ours ÷ diffusers' (within bf16 tolerance: ≤ 1.25)",
            ours and ours.get("err_ratio_vs_diffusers"),
            1.25,
            False,
            "×",
        ),
        check("base 50 steps + guidance, s per image (batch 1)", base and base["seconds"], 0.9, False, "s"),
        check("Flash 4 steps, s per image (batch 1)", flash and flash["seconds"], 0.20, False, "s"),
        check("MoVQ decode, best variant, whole image", min(movq) if movq else None, 0.070, False, "s"),
        check("KandiSuperRes 4× official windows", sr and sr["seconds"], 3.0, False, "s"),
        check("16 GB preset peak memory", b16 and b16.get("peak_gib"), 15.0, False, "GiB"),
    ]
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# gpu_suite — {env['device']}, {env['dtype']}{' (smoke)' if env['smoke'] else ''}",
        "",
        f"{env['date_utc']} UTC · torch {env['torch']} · diffusers {env['diffusers']} · transformers "
        f"{env['transformers']} · bitsandbytes {env['bitsandbytes']} · bf16 peak "
        f"{fmt(env['peak_bf16_tflops'], '.0f')} TFLOP/s · total {result['total_seconds']:.1f} s",
        "",
        "| section | row | time | TFLOP | TFLOP/s | MFU | peak GiB | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    skip_keys = {"section", "row", "seconds", "flops", "tflops", "mfu", "peak_gib", "skipped", "error", "mfu_note"}
    skip_keys |= {"traceback"}
    for r in result["rows"]:
        if r.get("skipped") or r.get("error"):
            t = f"skipped: {r['skipped']}" if r.get("skipped") else f"error: {r['error']}"
            lines.append(f"| {r['section']} | {r['row']} | – | – | – | – | – | {t.replace('|', '/')} |")
            continue
        sec = r["seconds"]
        time_s = f"{sec * 1e3:.1f} ms" if sec < 1 else f"{sec:.2f} s"
        notes = []
        for k, v in r.items():
            if k in skip_keys or v is None:
                continue
            if isinstance(v, float):
                v = f"{v:.3g}"
            notes.append(f"{k} {v}")
        lines.append(
            f"| {r['section']} | {r['row']} | {time_s} | {fmt(r['flops'] and r['flops'] / 1e12, '.3g')} | "
            f"{fmt(r['tflops'], '.3g')} | {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
            f"{fmt(r.get('peak_gib'), '.2f')} | {', '.join(notes).replace('|', '/')} |"
        )
    lines += ["", "| issue #19 target | measured | limit | met |", "|---|---|---|---|"]
    for t in result.get("targets", []):
        met = {True: "yes", False: "**no**", None: "n/a (smoke sizes)" if env["smoke"] else "–"}[t["met"]]
        name = t["target"].replace("|", "\\|")
        lines.append(f"| {name} | {fmt(t['measured'], '.3g')} {t['unit']} | {t['limit']:.3g} {t['unit']} | {met} |")
    lines += ["", "| section | status | seconds | rows | reason |", "|---|---|---|---|---|"]
    for name, info in result["sections"].items():
        reason = info.get("reason") or info.get("error") or ""
        lines.append(
            f"| {name} | {info['status']} | {info['seconds']:.1f} | {info['rows']} | {reason.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_suite", help="folder for results.json and results.md")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the same code paths), for CI")
    ap.add_argument("--time-budget", type=float, default=400.0, help="seconds; later sections are skipped")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 5; smoke 1)")
    ap.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 for the model rows")
    ap.add_argument("--bf16", action="store_true", help="bf16 on a CPU too (checks the bf16 code paths in --smoke)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: the default mode)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager' checks the wiring)")
    ap.add_argument("--smoke-compile", action="store_true", help="run the torch.compile rows in --smoke too")
    ap.add_argument(
        "--compile-variants",
        default="ours,diffusers",
        help="unet_compiled rows: comma list of ours, diffusers (a 3B U-Net compile costs minutes)",
    )
    ap.add_argument(
        "--compile-reserve",
        type=float,
        default=60.0,
        help="seconds of --time-budget that must be left to start one compilation",
    )
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the bf16 peak used for MFU")
    args = ap.parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)  # a shared CPU: OpenMP barriers of 2 threads stall when a core is taken
        if args.device is None:
            args.device = "cpu"
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = set(names) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    suite = Suite(args)
    result = suite.run(names)
    print()
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
