"""The optional dependencies (pyproject's extras) and the one command that installs each.

``pip install deepcount`` counts images; each extra adds what one more command needs.  A
command whose extra is missing stops with :class:`MissingExtraError`, whose message is the
install command for *this* installation: a checkout installed with ``pip install -e`` gets
``pip install torch==X -e "<its folder>[extra]"`` (the README's form: pinning the torch that is
installed, so pip never swaps it for another build), anything else ``pip install
"deepcount[extra]"``.
"""

from __future__ import annotations

import importlib
import json
import os
from importlib import metadata
from types import ModuleType

# extra -> (what it enables, the modules it provides)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "video": ("deepcount video (OpenCV)", ("cv2",)),
    "export": ("deepcount export and --backend onnxruntime (ONNX, onnxruntime)", ("onnx", "onnxruntime")),
    "serve": ("deepcount serve (FastAPI, uvicorn)", ("fastapi", "uvicorn", "multipart")),
    "train": ("deepcount train (Lightning, jsonargparse, TensorBoard)", ("lightning", "jsonargparse", "yaml")),
    "ray": ("deepcount count --ray (Ray Data)", ("ray", "pyarrow")),
}


class MissingExtraError(ImportError):
    """A command needs an extra that is not installed; the message says how to install it."""


def _checkout() -> str | None:
    """The folder this package was installed from with ``pip install -e``, or None."""
    try:
        info = json.loads(metadata.distribution("deepcount").read_text("direct_url.json") or "{}")
    except (metadata.PackageNotFoundError, ValueError):
        return None
    url = info.get("url", "")
    if not info.get("dir_info", {}).get("editable") or not url.startswith("file://"):
        return None
    folder = url[len("file://"):]
    rel = os.path.relpath(folder)
    return "." if rel == "." else rel if not rel.startswith("..") else folder


def install_command(extra: str) -> str:
    """The pip command that adds ``extra`` to this installation."""
    if extra not in EXTRAS:
        raise ValueError(f"no extra named {extra!r}; extras: {', '.join(EXTRAS)}")
    checkout = _checkout()
    if checkout is None:
        return f'pip install "deepcount[{extra}]"'
    try:
        torch_pin = f"torch=={metadata.version('torch').split('+')[0]} "
    except metadata.PackageNotFoundError:
        torch_pin = ""
    return f'pip install {torch_pin}-e "{checkout}[{extra}]"'


def require(extra: str, *modules: str) -> list[ModuleType]:
    """Import ``modules`` (default: all the extra provides), or raise :class:`MissingExtraError`
    naming what is missing, what needs it and the command that installs it."""
    what, provided = EXTRAS[extra]
    loaded = []
    for name in modules or provided:
        try:
            loaded.append(importlib.import_module(name))
        except ImportError as e:
            raise MissingExtraError(f"this needs the {extra!r} extra ({name} is missing; it enables {what}); "
                                    f"install it with: {install_command(extra)}") from e
    return loaded
