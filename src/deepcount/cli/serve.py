"""``deepcount serve``: the counting service (a web page and a JSON API) on a host and port."""

from __future__ import annotations

import argparse
import sys

from ..serve import ServeSettings, create_app, parse_size, service_url
from .common import BATCH_SIZE_HELP, TILING_HELP, TILING_MODES, add_device_option, add_model_option, positive_int
from . import COMMANDS

def _serve(args: argparse.Namespace) -> int:
    from ..extras import MissingExtraError, require

    try:
        uvicorn, *_ = require("serve", "uvicorn", "fastapi", "multipart")
    except MissingExtraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ..predict import Counter

    try:
        settings = ServeSettings(max_upload_bytes=args.max_upload_bytes, max_pixels=args.max_pixels,
                                 max_concurrency=args.max_concurrency, queue=args.queue,
                                 timeout=args.timeout, max_tiles=args.max_tiles,
                                 upload_timeout=args.upload_timeout, max_uploads=args.max_uploads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        counter = Counter.load(args.model, device=args.device, tiling=args.tiling,
                               batch_size=args.batch_size, max_pixels=args.max_pixels)
    except (KeyError, ValueError, OSError, ImportError) as e:
        print(f"error: cannot load model {args.model!r}: {e}", file=sys.stderr)
        return 2
    app = create_app(counter, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        sock = config.bind_socket()
    except SystemExit:  # uvicorn logs the reason (e.g. the port is in use)
        return 1
    print(f"model: {counter.description}", flush=True)
    if "baseline" in counter.description.lower():
        print("warning: this model is a baseline, not a trained DeepCount; "
              "its counts are the baseline's", flush=True)
    print(f"device: {counter.device}; up to {settings.max_concurrency} counting at once, "
          f"{settings.queue} waiting, {settings.timeout:g} s per request", flush=True)
    print(f"serving on {service_url(args.host, sock.getsockname()[1])}/  (Ctrl-C to stop)", flush=True)
    server.run(sockets=[sock])
    return 0


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_command(subparsers) -> None:
    """Register the `serve` subcommand on the `deepcount` parser."""
    d = ServeSettings()
    p = subparsers.add_parser("serve", help=COMMANDS["serve"][1],
                              description="Serve a counting model: POST /v1/count, GET /healthz, "
                                          "and a web page at /.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    add_model_option(p)
    add_device_option(p)
    p.add_argument("--tiling", default=None, choices=list(TILING_MODES),
                   help=TILING_HELP)
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=BATCH_SIZE_HELP)
    p.add_argument("--max-upload-bytes", type=_size_arg, default=d.max_upload_bytes,
                   help="largest upload: 20MB (default; MB = 10^6), 512KB, 20MiB, or bytes")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help=f"largest image in pixels, read from its header (default {d.max_pixels:,})")
    p.add_argument("--max-concurrency", type=int, default=d.max_concurrency,
                   help=f"requests counting at once (default {d.max_concurrency}; on a CPU torch "
                        "already uses every core for one request, so more only shares them)")
    p.add_argument("--queue", type=int, default=d.queue,
                   help=f"requests admitted beyond those counting (default {d.queue}); "
                        "more get 503 at once")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help=f"seconds per request once its upload has arrived (default {d.timeout:g}); "
                        "504 after that, and the counting stops")
    p.add_argument("--max-tiles", type=int, default=d.max_tiles,
                   help=f"most 384x512 tiles one image may take, from its header (default {d.max_tiles}); "
                        "413 beyond (a 1-pixel-high strip has few pixels but many tiles)")
    p.add_argument("--upload-timeout", type=float, default=d.upload_timeout,
                   help=f"seconds to receive an upload (default {d.upload_timeout:g}); 408 after that")
    p.add_argument("--max-uploads", type=int, default=d.max_uploads,
                   help=f"uploads received at once (default {d.max_uploads}); they hold no counting "
                        "place until they have arrived; 503 beyond")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_serve)

