"""What every command shares: argument types, the --model, --device, --tiling and --batch-size
options spelled once, and text that any output can hold."""

from __future__ import annotations

import argparse
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..regions import Region


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (subcommand modules share it)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# --batch-size of count, evaluate, video and serve (the default is engines.default_batch_size)
BATCH_SIZE_HELP = ("tiles per forward pass (default: 2 on a CPU, where more does not count faster "
                   "and only takes memory; 8 on a GPU)")


def device_arg(text: str) -> str:
    """argparse type of every command's ``--device``: auto, cpu, cuda or cuda:N (whether that
    device exists is checked by ``predict.resolve_device`` when the command runs)."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text) is None:
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def add_device_option(p: argparse.ArgumentParser, default: str = "auto", what: str = "") -> None:
    """``--device``, spelled and checked the same in every command."""
    p.add_argument("--device", default=default, type=device_arg, metavar="auto|cpu|cuda|cuda:N",
                   help=(what or "where the model runs") + "; auto: the first CUDA device if torch sees "
                        "one, else the CPU (default: %(default)s)")


def add_model_option(p: argparse.ArgumentParser) -> None:
    """``--model``, the same in every command (``evaluate`` also takes its old ``--weights``)."""
    p.add_argument("--model", default="default", metavar="NAME|FILE",
                   help="a registered model (`deepcount models` lists them; default: the bundled "
                        "default model) or a .safetensors file (its <stem>.json sidecar is read when "
                        "present); count, video and serve also run a `deepcount export` .onnx file")


# --tiling of count, evaluate, video and serve (deepcount.tiling.MODES, without importing torch)
TILING_MODES = ("pad", "grid", "features")
TILING_HELP = ("default: the model's own (its sidecar; `deepcount models` shows it), which is what it "
               "was measured with. pad: keep the scale, pad to whole 384x512 tiles. grid: resize to a "
               "grid of tiles (the authors' code); on frames much smaller than 2x2 tiles it is the "
               "fastest (a 640x480 frame: 1 tile instead of pad's 4, mostly padding) but changes the "
               "scale people appear at. features: the frontend over the whole image, the rest on "
               "48x64 tiles of its features (how frozen-frontend models are trained): no seams, no "
               "frontend work on padding. Keep it for such models: in pad their count head reads "
               "the padding as people (ShanghaiTech A test MAE 123 against 75, docs/RESULTS.md)")


def training_failure(e: BaseException) -> int | None:
    """The exit code of a training command (``train``, ``analyses``) that ``e`` ended, its line
    printed: 2 for a bad config or missing data, 1 for a run that failed (a non-finite loss);
    None for anything else (the caller re-raises it)."""
    import sys

    from ..config import ConfigError
    from ..datasets import DataNotFoundError
    from ..training import NonFiniteLossError

    code = 2 if isinstance(e, (ConfigError, DataNotFoundError)) else 1 if isinstance(e, NonFiniteLossError) else None
    if code is not None:
        print(f"error: {e}", file=sys.stderr)
    return code


def printable(name: str) -> str:
    """A file name as text that any output can hold: bytes that are not UTF-8 (a name from
    another encoding, kept by Python as surrogates) become ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def region_option(path: str | os.PathLike | None) -> tuple[list[Region] | None, str | None]:
    """A command's ``--region FILE``: its regions (None without the option), or the one-line
    reason it cannot be used."""
    from ..regions import RegionError, load_regions

    if path is None:
        return None, None
    try:
        return load_regions(path), None
    except RegionError as e:
        return None, f"--region: {e}"
