"""The ``deepcount`` command line: ``main`` parses the command and runs it.

One module per command (``count``, ``models`` and ``summary``, ``video``, ``export``, ``serve``,
``evaluate``, ``report``, ``analyses``, ``remote``, ``train``), each with ``add_command(subparsers)`` that registers its
parser and the function it runs; what they share (argument types, the --model, --device,
--tiling and --batch-size options) is in :mod:`deepcount.cli.common`.  The library modules
neither print nor parse arguments.  ``train`` has its own parser (YAML configs and
--section.key overrides), so it is dispatched before argparse sees the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from .. import __version__

# Each command: the module that registers it (add_command) and its line in `deepcount --help`.
# Only the invoked command's module is imported (it may import torch); --help lists them all.
COMMANDS = {
    "count": ("count", "count people in images"),
    "train": ("train", "train DeepCount or the CSRNet baseline from a YAML config (deepcount train --help)"),
    "models": ("models", "list the registered models"),
    "summary": ("models", "parameter counts per module (Table 1)"),
    "video": ("video", "count people in a video file, webcam or stream"),
    "export": ("export", "export a model to ONNX or TorchScript (checked against PyTorch on real photos)"),
    "serve": ("serve", "HTTP API and web page for counting (FastAPI + uvicorn)"),
    "evaluate": ("evaluate", "MAE/RMSE of a model on a dataset split (Tables 2-4, 7)"),
    "report": ("report", "the paper's tables (2, 3, 4, 7, 8, 9) with evaluation runs beside them"),
    "analyses": ("analyses", "rerun the paper's Tables 7, 8 and 9: train, evaluate, report (resumable)"),
    "remote": ("remote", "train on a machine that takes files in small loads: data in chunks, weights back in shards"),
}


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The library's warnings meant for the user (a misleading tiling) as the commands' own
    ``warning:`` lines; any other warning as Python shows it."""
    if category.__module__.startswith("deepcount.") and category.__name__ == "TilingWarning":
        print(f"warning: {message}", file=sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    """Run ``deepcount ARGV`` (default: ``sys.argv[1:]``); returns the exit code."""
    import importlib

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from .train import main as train_main

        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="deepcount", description="DeepCount crowd counting")
    parser.add_argument("--version", action="version", version=f"deepcount {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    asked = argv[0] if argv and argv[0] in COMMANDS else None
    registered: set[str] = set()
    if asked is not None:
        module = importlib.import_module(f".{COMMANDS[asked][0]}", __name__)
        module.add_command(sub)
        registered = {name for name, (mod, _) in COMMANDS.items() if mod == COMMANDS[asked][0]}
    for name, (_, line) in COMMANDS.items():
        if name not in registered:
            sub.add_parser(name, help=line, add_help=False)
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except BrokenPipeError:  # whoever read stdout went away (`deepcount models | head -3`)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
