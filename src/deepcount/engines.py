"""How a counting network runs its tiles: the inference engines behind ``Counter(engine=...)``.

An engine is a way to run the *same* weights; it never changes what the network is, only the
memory layout, the arithmetic precision and whether the graph is compiled:

=================  =================================================================  ==========
engine             what it does                                                       devices
=================  =================================================================  ==========
``eager``          the network as written: NCHW float32, PyTorch's default flags       cpu, cuda
``channels_last``  NHWC tiles (oneDNN / cuDNN's native layout), float32; on the CPU    cpu, cuda
                   freed activation memory is kept for reuse (:func:`retain_cpu_memory`)
``compile``        ``channels_last`` through ``torch.compile`` (inductor)              cpu, cuda
``tf32``           ``channels_last`` with TF32 convolutions and matmuls                cuda
``bf16``           ``channels_last`` under bfloat16 autocast; the count head, density  cpu, cuda
                   map sums and every output stay float32
``cudagraphs``     ``bf16`` compiled with CUDA graphs (``mode="reduce-overhead"``)     cuda
=================  =================================================================  ==========

``auto`` is the fastest engine whose counts equal ``eager``'s within float32 tolerance, as
measured side by side by ``bench/throughput.py`` (docs/PERFORMANCE.md): on the CPU that is
``channels_last``, 1.5x ``eager`` at batch 8 (``compile`` is within 2% of it after a first
call that compiles for seconds to a minute; onnxruntime, ``Counter.load(..., backend=
"onnxruntime")``, within 1%).  On CUDA ``auto`` is ``channels_last`` too until a GPU
measurement says otherwise.  ``bf16``, ``tf32`` and ``cudagraphs`` are opt-in because they
change the numerics (``bench/bf16_counts.py`` measures bf16 counts against float32 on
ShanghaiTech B test).  ``eager`` forces the plain path.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .features import frontend_features

ENGINES = ("auto", "eager", "channels_last", "compile", "tf32", "bf16", "cudagraphs")
PRECISIONS = ("default", "fp32", "tf32", "bf16")
CUDA_ONLY = ("tf32", "cudagraphs")
# What ``auto`` means on each device (bench/throughput.py measured the CPU choice; the CUDA
# one is the float32-exact layout change, pending a GPU measurement).
AUTO: dict[str, str] = {"cpu": "channels_last", "cuda": "channels_last"}
# Tiles per forward pass when the caller does not say.  On the CPU the batch size barely
# changes throughput (1.735-1.766 tiles/s for batches of 1, 2, 4 and 8) but each extra tile
# holds 90-170 MB of activations: peak RSS 766 MB at 2, 2,039 MB at 8 (docs/PERFORMANCE.md,
# "Tiles per forward pass").  On CUDA: 8, pending a GPU measurement.
AUTO_BATCH_SIZE: dict[str, int] = {"cpu": 2, "cuda": 8}


DEVICES = ("auto", "cpu", "cuda")  # and cuda:N


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` are checked
    against what torch sees, so a bad device is a clear ``ValueError`` here and not a torch
    error in the middle of a run."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda or cuda:N, got {str(device)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA device "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                             "use device 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} asked for, but torch sees "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def default_batch_size(device: str | torch.device = "cpu") -> int:
    """Tiles per forward pass for ``device`` when none is asked for (:data:`AUTO_BATCH_SIZE`)."""
    return AUTO_BATCH_SIZE.get(torch.device(device).type, 8)

@dataclass(frozen=True)
class Engine:
    """One way to run a network: ``precision`` is ``default`` (PyTorch's flags as they are),
    ``fp32`` (no TF32 anywhere), ``tf32`` or ``bf16`` (autocast; outputs float32);
    ``retain_memory``: on the CPU, keep freed activation memory for the next layer and the next
    batch instead of handing it back to the OS (:func:`retain_cpu_memory`)."""

    name: str
    channels_last: bool = False
    precision: str = "default"
    compile: bool = False
    cuda_graphs: bool = False
    retain_memory: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


PRESETS: dict[str, Engine] = {
    "eager": Engine("eager"),
    "channels_last": Engine("channels_last", channels_last=True, retain_memory=True),
    "compile": Engine("compile", channels_last=True, compile=True, retain_memory=True),
    "tf32": Engine("tf32", channels_last=True, precision="tf32"),
    "bf16": Engine("bf16", channels_last=True, precision="bf16", retain_memory=True),
    "cudagraphs": Engine("cudagraphs", channels_last=True, precision="bf16", compile=True,
                         cuda_graphs=True),
}

# ----------------------------------------------------------------------------- CPU memory
# glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh
# mmap and unmaps it on free, so each of the network's activations (a 384x512x64 float map is
# 50 MiB per tile) is page-faulted and zeroed by the kernel again at every layer of every
# batch: ~540,000 page faults and ~1.5 s of system time per batch of 8 tiles at width 1.0 on
# the reference machine.  Keeping freed memory in the heap removes them (docs/PERFORMANCE.md).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_RETAIN = {_M_TRIM_THRESHOLD: 2 ** 31 - 1, _M_MMAP_MAX: 0}  # mallopt takes a C int
_retaining = False


def _libc():
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def retain_cpu_memory(enable: bool = True) -> bool:
    """Make glibc's malloc keep freed memory for reuse (no mmap per large block, no trimming),
    so activations are not page-faulted again at every layer and batch; the process keeps its
    peak memory instead of returning it.  ``enable=False`` restores glibc's defaults and
    returns the free memory to the OS.  Process-wide; the CPU engines other than ``eager``
    turn it on.  Returns whether it applies (glibc on Linux)."""
    global _retaining
    libc = _libc()
    if libc is None:
        return False
    for param, value in (_RETAIN if enable else _GLIBC_DEFAULTS).items():
        libc.mallopt(param, value)
    if not enable:
        libc.malloc_trim(0)
    _retaining = enable
    return True


def retaining_cpu_memory() -> bool:
    """Whether :func:`retain_cpu_memory` is on in this process."""
    return _retaining


@contextlib.contextmanager
def glibc_malloc_defaults() -> Iterator[None]:
    """The body runs with glibc's default malloc behaviour (the state of a fresh process: free
    memory returned first), then the previous setting is restored; for benchmarks comparing
    against the plain path."""
    was = _retaining
    retain_cpu_memory(False)
    try:
        yield
    finally:
        if was:
            retain_cpu_memory(True)


def resolve_engine(engine: str | Engine | None, device: str | torch.device = "cpu") -> Engine:
    """The :class:`Engine` for a name (``auto`` -> this device's default) on ``device``;
    a CUDA-only engine on the CPU is a ``ValueError``."""
    kind = torch.device(device).type
    if isinstance(engine, Engine):
        resolved = engine
    else:
        name = "auto" if engine is None else str(engine)
        if name not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        resolved = PRESETS[AUTO.get(kind, "eager") if name == "auto" else name]
    if kind != "cuda" and (resolved.name in CUDA_ONLY or resolved.cuda_graphs
                           or resolved.precision == "tf32"):
        raise ValueError(f"engine {resolved.name!r} needs a CUDA device, got {str(device)!r}")
    return resolved


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says the host or the GPU ran out of memory (what a smaller batch may fix)."""
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e)))


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively: a GPU that supports it, or a CPU with
    AVX-512 (oneDNN's bf16 kernels).  Elsewhere bf16 is emulated and far slower than float32
    (an AVX2-only CPU cached frontend features at 23 s per image in bf16 against 1.8 s in
    float32), so ``auto`` precisions choose float32 there."""
    kind = torch.device(device).type
    try:
        if kind == "cuda":
            return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if kind == "cpu":
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    return False


@contextlib.contextmanager
def precision_context(precision: str, device_type: str) -> Iterator[None]:
    """Run the body in ``precision``; global TF32 flags are restored afterwards."""
    if precision == "bf16":
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
        return
    if precision == "default" or device_type != "cuda":
        yield
        return
    want = "tf32" if precision == "tf32" else "ieee"
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if conv is not None:  # torch >= 2.9: the fp32_precision API
        old = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
        torch.backends.cuda.matmul.fp32_precision = want
        torch.backends.cudnn.conv.fp32_precision = want
        try:
            yield
        finally:
            torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = old
    else:
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = want == "tf32"
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def forward(model: nn.Module, batch: Tensor, branches: Sequence[int] = (),
            low_precision: bool = False, level: str | None = None) -> tuple[Tensor, dict[int, Tensor]]:
    """(counts (b,) float32, ``{branch: map (b, h, w) float32}`` for each of ``branches``) for
    a network of :data:`deepcount.model.ARCHITECTURES` (or any module with ``forward`` and, when
    maps are asked for, ``forward_maps``).  Only the branches asked for run; none: the backbone
    alone.  A network that ``counts_by_map`` (CSRNet) counts by its one map, which it gives for
    any branch asked.  ``low_precision``: the body runs under an active autocast; a DeepCount's
    count head and every sum run in float32.  ``level``: ``batch`` holds 48x64 crops of a
    DeepCount frontend's features at that level (tiling mode ``features``).

    A DeepCount's count head and branches end in linear layers, so a sparse tile could get a
    negative count or negative cells: at inference both are clamped at 0 (nobody is there)."""
    branches = tuple(branches)
    at = {"level": level} if level is not None else {}
    if getattr(model, "counts_by_map", False):
        _, maps = model.forward_maps(batch, model.density_branches[:1], **at)
        density = next(iter(maps.values())).float()
        return density.sum((1, 2, 3)), {b: density[:, 0] for b in branches}
    if branches or (low_precision and hasattr(model, "forward_maps")):
        if low_precision:
            at["float32_head"] = True
        count, maps = model.forward_maps(batch, branches, **at)
    else:
        count, maps = model(batch, **at), {}
    count, maps = count.float(), {b: m.float()[:, 0] for b, m in maps.items()}
    # a network that regresses its count (DeepCount) ends in linear layers: clamp at 0
    count, maps = count.clamp_min(0), {b: m.clamp_min(0) for b, m in maps.items()}
    return count, maps


class Runner(Protocol):
    """What counts batches of tiles for :func:`deepcount.tiling.count_tiles`: a PyTorch network
    through an engine (:class:`TorchRunner`) or an exported model's session
    (:class:`deepcount.export.OnnxRunner`).

    ``runner(batch, branches)`` -> (counts (b,), ``{branch: map (b, h, w)}`` for each branch
    asked; none: no branch runs).  ``counts_by_map``: its count is its map's sum, so a tiled
    count must leave out the map cells in a tile's padding (CSRNet).  ``level``: its batches are
    48x64 tiles of frontend features at that level, and ``frontend(image)`` makes them
    (``(H, W, 3) uint8 -> (C, H/8, W/8)``); None: its batches are 384x512 image tiles."""

    counts_by_map: bool
    level: str | None

    def __call__(self, batch: Tensor, branches: Sequence[int] = ()) -> tuple[Tensor, dict[int, Tensor]]: ...

    def frontend(self, image: Any) -> Tensor: ...


class TorchRunner:
    """:class:`Runner` of a PyTorch ``model`` through ``engine``: ``device`` is where the model
    is; ``level``: its batches are feature crops at that frontend level.  ``engine`` (the
    resolved :class:`Engine`) names what it runs."""

    def __init__(self, model: nn.Module, engine: str | Engine | None = "eager",
                 device: str | torch.device | None = None, level: str | None = None):
        if device is None:
            param = next(model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        self.model, self.device, self.level = model, torch.device(device), level
        self.engine = resolve_engine(engine, self.device)
        self.counts_by_map = bool(getattr(model, "counts_by_map", False))
        self._low = self.engine.precision == "bf16"
        if self._low and not native_bf16(self.device):
            warnings.warn(f"engine {self.engine.name!r} runs bfloat16, which this {self.device.type} only emulates "
                          "(120x slower than float32 counting one 384x512 crop on an AVX2-only EPYC); "
                          "engine='auto' is faster here",
                          stacklevel=3)
        if level is not None and level not in getattr(model, "feature_levels", ()):
            raise ValueError(f"feature-level tiling needs a DeepCount, not a {type(model).__name__}")
        if self.engine.retain_memory and self.device.type == "cpu" and not _retaining:
            retain_cpu_memory(True)
        self._step: Callable = self._forward
        if self.engine.compile:
            self._step = torch.compile(self._forward, mode="reduce-overhead" if self.engine.cuda_graphs else None)

    def _forward(self, batch: Tensor, branches: tuple[int, ...]) -> tuple[Tensor, dict[int, Tensor]]:
        return forward(self.model, batch, branches, self._low, self.level)

    def __call__(self, batch: Tensor, branches: Sequence[int] = ()) -> tuple[Tensor, dict[int, Tensor]]:
        # (tiling.tile_batches makes channels_last tiles: for `eager` this is the NCHW copy)
        batch = batch.contiguous(memory_format=torch.channels_last if self.engine.channels_last
                                 else torch.contiguous_format)
        with precision_context(self.engine.precision, self.device.type):
            if self.engine.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            count, maps = self._step(batch, tuple(branches))
        if self.engine.cuda_graphs:  # the graph's output buffers are overwritten by the next replay
            count, maps = count.clone(), {b: m.clone() for b, m in maps.items()}
        return count, maps

    def frontend(self, image: Any) -> Tensor:
        """The features at ``level`` of a whole (H, W, 3) uint8 image (tiling ``features``)."""
        if self.level is None:
            raise ValueError("this runner takes image tiles: it has no frontend level")
        return frontend_features(self.model, image, self.level, device=self.device,
                                 precision="bf16" if self._low else "fp32")


def engine_runner(model: nn.Module, engine: str | Engine | None = "eager",
                  device: str | torch.device | None = None, level: str | None = None) -> TorchRunner:
    """The :class:`Runner` of ``model`` with ``engine`` (default: the plain eager path) on
    ``device`` (default: where its parameters are); ``level`` as in :class:`TorchRunner`."""
    return TorchRunner(model, engine, device, level)


__all__ = ["AUTO", "AUTO_BATCH_SIZE", "ENGINES", "Engine", "PRESETS", "default_batch_size", "engine_runner", "native_bf16", "out_of_memory",
           "forward", "glibc_malloc_defaults",
           "precision_context", "resolve_engine", "Runner", "TorchRunner", "retain_cpu_memory", "retaining_cpu_memory"]
