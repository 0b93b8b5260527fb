"""``deepcount remote``: a dataset to a remote machine in hash-checked chunks, weights back in
float16 shards (:mod:`deepcount.remote`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import COMMANDS


def _files(paths: list[str]) -> list[Path]:
    out = []
    for x in map(Path, paths):
        out += sorted(p for p in x.rglob("*") if p.is_file()) if x.is_dir() else [x]
    return out


def _run(args: argparse.Namespace) -> int:
    from .. import remote

    try:
        if args.verb == "pack":
            files = _files(args.files)
            chunks = remote.pack(files, args.root, args.dst, int(args.chunk_mb * 2 ** 20))
            print(f"{len(files)} files in {len(chunks)} chunk(s) under {args.dst}")
        elif args.verb == "unpack":
            print(f"{remote.unpack(args.chunks, args.manifest, args.root)} files unpacked and checked under {args.root}")
        elif args.verb == "start":
            print(remote.start_file(args.model, args.dst))
        elif args.verb == "shards":
            src = Path(args.src)
            if src.suffix == ".ckpt":
                from ..training import checkpoint_state
                state = checkpoint_state(src)
            else:
                from safetensors.torch import load_file
                state = load_file(str(src))
            side = json.loads(Path(args.sidecar).read_text()) if args.sidecar else {}
            out = remote.write_shards(state, args.dst, args.name, int(args.max_mb * 2 ** 20), side)
            print(f"{out}: {len(json.loads(out.read_text())['shards'])} shard(s)")
        else:
            print(remote.join_shards(args.manifest, args.dst))
    except (OSError, ValueError, KeyError) as e:  # a missing or changed file, a name not registered
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def add_command(subparsers) -> None:
    """Register the `remote` subcommand on the `deepcount` parser."""
    p = subparsers.add_parser(
        "remote", help=COMMANDS["remote"][1],
        description="Train on a machine that takes files in small loads: pack a dataset into tar "
                    "chunks with a manifest of sha256s and unpack them there (checked), write a model "
                    "as one whole-network start file, send weights back as float16 shards under a size "
                    "and join them here (checked). Exit code 2 if a file is missing, changed or would "
                    "be overwritten (nothing is).")
    sub = p.add_subparsers(dest="verb", required=True)
    a = sub.add_parser("pack", help="files under ROOT into tar chunks and a manifest")
    a.add_argument("root", help="the folder the chunks' paths are relative to (e.g. the data root)")
    a.add_argument("dst", help="an empty folder for the chunks and manifest.json")
    a.add_argument("files", nargs="+", help="files or folders under ROOT")
    a.add_argument("--chunk-mb", type=float, default=15.0, help="MiB of files per chunk (default 15)")
    a = sub.add_parser("unpack", help="chunks into ROOT, each file's sha256 checked")
    a.add_argument("manifest")
    a.add_argument("root")
    a.add_argument("chunks", nargs="+")
    a = sub.add_parser("start", help="a model as one whole-network float16 file (frozen layers filled in)")
    a.add_argument("model", help="a registered model (or default) or a .safetensors file")
    a.add_argument("dst")
    a = sub.add_parser("shards", help="a .safetensors file or a training checkpoint as float16 shards")
    a.add_argument("src")
    a.add_argument("dst", help="folder for NAME.shard-NNN.safetensors and NAME.shards.json")
    a.add_argument("--name", required=True)
    a.add_argument("--max-mb", type=float, default=15.0, help="MiB of tensors per shard (default 15)")
    a.add_argument("--sidecar", help="a JSON file kept in the manifest (and the joined file's sidecar)")
    a = sub.add_parser("join", help="shards back into one .safetensors file, every shard and tensor checked")
    a.add_argument("manifest")
    a.add_argument("dst")
    p.set_defaults(func=_run)
