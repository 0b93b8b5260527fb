"""``deepcount serve``: an HTTP API and a small offline web page around a :class:`Counter`.

Endpoints
---------
``POST /v1/count``
    The photo as the multipart field ``image`` (or, equally, as a raw ``image/*`` or
    ``application/octet-stream`` body).  Answers JSON ``{count, tiles, height, width,
    seconds, model, description, tiling, device}``; ``seconds`` is the model's own time
    (decoding excluded, queueing excluded).  ``?density=1`` adds ``density_png``: a base64
    PNG of the counter's finest density map over the photo (:func:`deepcount.pictures.overlay`):
    the photo's size, and its colour bar to the right.  ``?density=1&format=png`` answers that PNG itself (``image/png``), with
    the count in the ``X-Count`` header.
``GET /healthz``
    ``{"status": "ok", "model": ..., "device": ..., "counting": n, "waiting": n}``.
``GET /``
    The web page (``deepcount/static/``; no external assets, works offline).

Limits (every error is JSON ``{"detail": "..."}``)
-------------------------------------------------
* **Upload size** -> 413.  Refused from ``Content-Length`` before a byte of the body is read,
  and enforced again while the body streams in (chunked uploads have no length).  The limit
  applies to the image; the multipart envelope may add up to 64 KiB on top of it.
* **Pixels and tiles** -> 413 (the size is the problem, as with bytes, so the same status).
  Read from the image header before any pixel is decoded (:func:`deepcount.images.image_size`)
  and before the request is admitted: at most ``max_pixels`` pixels and ``max_tiles`` tiles
  with the model's tiling (a 1x25,000,000 strip is 25 MP but 48,829 tiles).
* **Not an image, truncated or corrupt** -> 422 with the reason from :mod:`deepcount.images`.
* **Concurrency** -> 503 with ``Retry-After``.  An upload is received first, at most
  ``max_uploads`` at once, each within ``upload_timeout`` (408 after it): a slow sender holds
  no counting place.  Then at most ``max_concurrency`` requests count at once and at most
  ``queue`` more are admitted to wait for a slot.  Anything beyond is refused at once: nothing
  queues without bound.
* **Time** -> 504.  ``timeout`` bounds the request once its upload has arrived: waiting for a
  slot and counting.  Counting runs in a worker thread (torch releases the GIL, the event loop
  stays free); a computation whose request timed out stops before its next batch of tiles and
  only then frees its slot, so a stream of requests that all time out turns into 503s instead
  of piling up hidden work.
* **Model errors** -> 500 with the exception's message; the slot is released.
* Also: 415 for a body that is neither multipart nor an image, 422 for a multipart body
  without the file field ``image``, 400 for ``density=1`` asked of a model without maps.

Defaults (:class:`ServeSettings`, the same as the command's): 20 MB uploads, 25 megapixels
(below the library's 89 MP: the overlay alone needs ~24 bytes per pixel), 2 counting at once
(on a CPU they share the cores torch already uses; a second slot keeps a small photo from
waiting for a whole large one), 8 waiting, 120 s.

``create_app(counter, settings)`` builds the app around any object with ``Counter``'s
``count(image, density=None | 1)``, ``name``, ``description``, ``tiling`` and ``device``.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations, and
# ``Request`` is imported inside ``create_app`` (fastapi is an optional dependency).
import asyncio
import base64
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__

STATIC_DIR = Path(__file__).parent / "static"
MULTIPART_ALLOWANCE = 64 * 1024  # envelope bytes allowed on top of the image in a multipart body
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

log = logging.getLogger("deepcount.serve")


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ServeSettings:
    """The server's limits (see the module docstring for what each one answers)."""

    max_upload_bytes: int = 20_000_000  # 20 MB (decimal)
    max_pixels: int = 25_000_000  # 25 megapixels: a 12 MP phone photo fits twice over
    max_concurrency: int = 2  # requests counting at once
    queue: int = 8  # admitted requests beyond those counting
    timeout: float = 120.0  # seconds per request, from admission (its upload received) to answer
    max_tiles: int = 256  # tiles of one image (a thin strip is few pixels but many tiles)
    upload_timeout: float = 30.0  # seconds to receive one upload, before it is admitted
    max_uploads: int = 64  # uploads being received at once (they hold no counting place)

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_concurrency", "max_tiles", "max_uploads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.queue, bool) or not isinstance(self.queue, int) or self.queue < 0:
            raise ValueError(f"queue must be an int >= 0, got {self.queue!r}")
        if not self.timeout > 0 or not self.upload_timeout > 0:
            raise ValueError(f"timeout and upload_timeout must be > 0 seconds, got {self.timeout!r}, "
                             f"{self.upload_timeout!r}")


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
               "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(text: str | int) -> int:
    """``"20MB"`` -> 20_000_000; ``"20MiB"`` -> 20_971_520; ``"512kb"``, ``"1048576"``."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 20MB, 512KB, 20MiB, 1048576)")
    value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if value < 1:
        raise ValueError(f"size must be at least 1 byte, got {text!r}")
    return value


# ----------------------------------------------------------------------------- admission
class _Gate:
    """Admission and counting slots.  Used from the event loop only (no locks needed).

    ``admitted`` counts requests holding a ticket: receiving their upload, waiting for a slot,
    or counting (a timed-out computation included, until it ends); at most
    ``slots + queue``.  ``busy`` counts slots held; at most ``slots``.
    """

    def __init__(self, slots: int, queue: int):
        self.slots, self.queue = slots, queue
        self.admitted = 0
        self.busy = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return self.admitted - self.busy

    def admit(self) -> bool:
        if self.admitted >= self.slots + self.queue:
            return False
        self.admitted += 1
        return True

    def leave(self) -> None:
        self.admitted -= 1

    async def acquire(self, timeout: float) -> None:
        if self.busy < self.slots and not self._waiters:
            self.busy += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, max(0.0, timeout))  # a result: a slot was handed over
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot just as we gave up: pass it on
            else:
                fut.cancel()
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot goes straight to the next waiter
                return
        self.busy -= 1


class _TooLarge(Exception):
    pass


class _Expired(Exception):
    pass


def _picture_branch(counter: Any) -> int:
    """The density map the overlay shows: the counter's finest (1 for a stand-in without one)."""
    return getattr(counter, "picture_branch", None) or 1


class _Service:
    """Everything one app instance holds: the counter, its limits, slots and worker threads."""

    def __init__(self, counter: Any, settings: ServeSettings):
        self.counter = counter
        self.settings = settings
        self.gate = _Gate(settings.max_concurrency, settings.queue)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self.avg_seconds = 0.0  # moving average of the model's time, for Retry-After
        self.uploading = 0  # uploads being received (not yet admitted)
        import inspect

        try:  # a Counter stops at a deadline between batches of tiles; a stand-in may not
            self._deadline = "deadline" in inspect.signature(counter.count).parameters
        except (TypeError, ValueError):
            self._deadline = False

    def tiles(self, height: int, width: int) -> int:
        """How many tiles counting an image of this size takes with the counter's tiling."""
        from .tiling import MODES, plan_tiles

        tiling = self.tiling if self.tiling in MODES else "pad"
        return len(plan_tiles(height, width, tiling))

    # -- model information (any Counter-like object)
    @property
    def name(self) -> str:
        return str(getattr(self.counter, "name", type(self.counter).__name__))

    @property
    def description(self) -> str:
        return str(getattr(self.counter, "description", self.name))

    @property
    def device(self) -> str:
        return str(getattr(self.counter, "device", "?"))

    @property
    def tiling(self) -> str:
        return str(getattr(self.counter, "tiling", "?"))

    @property
    def executor(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                # Never more workers than slots: the gate already bounds the work, so nothing
                # ever waits inside the executor, invisible to the limits.
                self._executor = ThreadPoolExecutor(self.settings.max_concurrency,
                                                    thread_name_prefix="deepcount-count")
            return self._executor

    def shutdown(self) -> None:
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None

    def retry_after(self) -> str:
        return str(max(1, math.ceil(self.avg_seconds)))

    # -- the work done in a worker thread
    def work(self, data: bytes, density: bool, as_png: bool = False,
             deadline: float | None = None, regions: list | None = None) -> tuple[dict, bytes | None]:
        """Decode, count and (``density``) draw the overlay: all of the heavy lifting, so
        that it runs here, in a worker thread, and never on the event loop.  ``deadline``
        (``time.monotonic()``): the counting stops there, within a batch of tiles."""
        from .images import load_image
        from .pictures import overlay, png_bytes

        image = load_image(data, max_pixels=self.settings.max_pixels)
        # Counting the decoded array is exactly Counter.count(data): that is what it does first.
        extra = {"deadline": deadline} if self._deadline and deadline is not None else {}
        if regions is not None:
            extra["regions"] = regions
        result = self.counter.count(image, density=_picture_branch(self.counter) if density or regions else None,
                                    **extra)
        height, width = result.image_size
        out = {"count": float(result.count), "tiles": int(result.tiles), "height": int(height),
               "width": int(width), "seconds": float(result.seconds)}
        if result.regions is not None:
            out["regions"] = result.regions
        png = None
        if density:
            picture = overlay(image, result.density, result.count)
            if regions is not None:
                from .regions import draw_regions

                picture = draw_regions(picture, regions, result.regions)
            png = png_bytes(picture)
        if png is not None and not as_png:
            out["density_png"] = base64.b64encode(png).decode("ascii")
            png = None
        return out, png


# ----------------------------------------------------------------------------- the app
def create_app(counter: Any, settings: ServeSettings | None = None):
    """The FastAPI app serving ``counter`` under ``settings`` (default :class:`ServeSettings`)."""
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.requests import ClientDisconnect

    from .engines import out_of_memory
    from .images import ImageLoadError, image_size

    settings = settings or ServeSettings()
    service = _Service(counter, settings)
    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.shutdown()

    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, and this server is
    # meant to work offline.  The schema itself is at /openapi.json.
    app = FastAPI(title="deepcount", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None,
                  description="Crowd counting with DeepCount. " + service.description)
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Anything not turned into an HTTPException above still answers JSON.
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    def too_large(detail: str) -> HTTPException:
        # Connection: close, so the server does not go on reading a huge body just to discard it.
        return HTTPException(413, detail, headers={"Connection": "close"})

    async def read_image(request: Request) -> bytes:
        limit = settings.max_upload_bytes
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        multipart = ctype == "multipart/form-data"
        if not (multipart or ctype.startswith("image/") or ctype == "application/octet-stream"):
            raise HTTPException(415, "send the photo as the multipart/form-data file field "
                                     "'image' (or as a raw image/* body)")
        body_limit = limit + MULTIPART_ALLOWANCE if multipart else limit

        async def limited():
            total = 0
            async with aclosing(request.stream()) as stream:
                async for chunk in stream:
                    total += len(chunk)
                    if total > body_limit:
                        raise _TooLarge()
                    yield chunk

        try:
            if multipart:
                parser = MultiPartParser(request.headers, limited(), max_files=1, max_fields=16,
                                         max_part_size=MULTIPART_ALLOWANCE)
                try:
                    form = await parser.parse()
                except MultiPartException as e:
                    raise HTTPException(422, f"malformed multipart body: {e.message}") from e
                try:
                    upload = form.get("image")
                    if upload is None:
                        raise HTTPException(422, "the multipart body has no field 'image'")
                    if isinstance(upload, str):
                        raise HTTPException(422, "the field 'image' must be a file upload")
                    data = await upload.read()
                finally:
                    await form.close()
            else:
                chunks = []
                async for chunk in limited():
                    chunks.append(chunk)
                data = b"".join(chunks)
        except _TooLarge:
            raise too_large(f"upload exceeds the limit of {limit:,} bytes") from None
        except ClientDisconnect:
            raise HTTPException(400, "client disconnected before the upload was complete") from None
        if len(data) > limit:
            raise too_large(f"upload of {len(data):,} bytes exceeds the limit of {limit:,} bytes")
        if not data:
            raise HTTPException(422, "the uploaded file is empty (0 bytes)")
        return data

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(index_html, headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model": service.name, "device": service.device,
                "counting": service.gate.busy, "waiting": service.gate.waiting}

    @app.post("/v1/count", openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}}}}})
    async def count(request: Request,
                    density: str | None = Query(None, description="1: add the density overlay"),
                    region: str | None = Query(None, description="count inside polygons too: JSON, "
                                               '[[x, y], ...] in image pixels or {"name": [[x, y], ...], ...}'),
                    format: str = Query("json", pattern="^(json|png)$",
                                        description="png: answer the overlay PNG itself")):
        """Count the people in one photo."""
        want = (density or "").strip().lower()
        if want not in _TRUE | _FALSE:
            raise HTTPException(422, f"density must be 1 or 0, got {density!r}")
        want_density = want in _TRUE or format == "png"
        branches = getattr(service.counter, "density_branches", None)
        if want_density and branches is not None and not branches:
            raise HTTPException(400, f"model {service.name} gives no density map; ask without density=1")
        regions = None
        if region is not None:
            from .regions import RegionError, parse_regions

            try:
                regions = parse_regions(region)
            except RegionError as e:
                raise HTTPException(422, f"region: {e}") from None
            if branches is not None and not branches:
                raise HTTPException(400, f"model {service.name} gives no density map to count regions with")

        length = request.headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise HTTPException(400, f"bad Content-Length {length!r}") from None
            multipart = request.headers.get("content-type", "").lower().startswith("multipart/")
            allowed = settings.max_upload_bytes + (MULTIPART_ALLOWANCE if multipart else 0)
            if n > allowed:  # before reading a single byte of the body
                raise too_large(f"upload of {n:,} bytes exceeds the limit of "
                                f"{settings.max_upload_bytes:,} bytes")

        # The upload first, under its own deadline and count: a slow sender holds no place
        # among the requests admitted to counting.
        if service.uploading >= settings.max_uploads:
            raise HTTPException(503, f"server busy: {service.uploading} uploads being received; try again "
                                     "later", headers={"Retry-After": service.retry_after()})
        service.uploading += 1
        try:
            data = await asyncio.wait_for(read_image(request), settings.upload_timeout)
        except TimeoutError:
            raise HTTPException(408, f"upload not received within {settings.upload_timeout:g} s",
                                headers={"Connection": "close"}) from None
        finally:
            service.uploading -= 1
        try:  # the header only: cheap, and nothing is admitted for a bad or too big file
            height, width = await run_in_threadpool(image_size, data)
        except ImageLoadError as e:
            raise HTTPException(422, f"not a usable image: {e.reason}") from None
        if height * width > settings.max_pixels:
            raise too_large(f"image of {width}x{height} = {width * height:,} pixels exceeds "
                            f"the limit of {settings.max_pixels:,} pixels")
        tiles = service.tiles(height, width)
        if tiles > settings.max_tiles:
            raise too_large(f"image of {width}x{height} pixels needs {tiles:,} tiles of 384x512 "
                            f"({service.tiling} tiling), over the limit of {settings.max_tiles:,}")

        gate = service.gate
        if not gate.admit():
            raise HTTPException(503, f"server busy: {gate.busy} counting and {gate.waiting} "
                                     "waiting already; try again later",
                                headers={"Retry-After": service.retry_after()})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.timeout
        handed_over = False  # True once the ticket belongs to a running computation
        try:
            try:
                await gate.acquire(deadline - loop.time())
            except TimeoutError:
                raise HTTPException(504, f"timed out after {settings.timeout:g} s waiting for "
                                         "a free counting slot") from None

            started = time.perf_counter()
            try:
                stop = time.monotonic() + max(0.0, deadline - loop.time())  # the work ends with the request
                fut = loop.run_in_executor(service.executor, service.work, data, want_density,
                                           format == "png", stop, regions)
            except BaseException:
                gate.release()
                raise
            handed_over = True

            def finished(f: asyncio.Future) -> None:
                # Runs when the computation really ends, even after a 504 was answered.
                gate.release()
                gate.leave()
                if not f.cancelled() and f.exception() is None:
                    seconds = time.perf_counter() - started
                    service.avg_seconds = seconds if service.avg_seconds == 0 else (
                        0.8 * service.avg_seconds + 0.2 * seconds)

            fut.add_done_callback(finished)
            try:
                try:
                    out, png = await asyncio.wait_for(asyncio.shield(fut), deadline - loop.time())
                except TimeoutError:
                    from .tiling import CountTimeout

                    error = fut.exception() if fut.done() and not fut.cancelled() else None
                    if error is not None and not isinstance(error, CountTimeout):
                        raise error from None  # the model's own TimeoutError
                    raise _Expired() from None
            except _Expired:
                raise HTTPException(504, f"counting did not finish within {settings.timeout:g} s; "
                                         "it stops at its next batch of tiles and then frees "
                                         "its slot") from None
            except ImageLoadError as e:
                raise HTTPException(422, f"not a usable image: {e.reason}") from None
            except Exception as e:
                if out_of_memory(e):
                    log.exception("out of memory while counting")
                    raise HTTPException(500, "counting failed: out of memory") from None
                log.exception("counting failed")
                text = str(e).strip()
                raise HTTPException(500, f"counting failed: {type(e).__name__}"
                                         + (f": {text}" if text else "")) from None
        finally:
            if not handed_over:
                gate.leave()

        if format == "png":
            return Response(png, media_type="image/png", headers={
                "X-Count": repr(out["count"]), "X-Tiles": str(out["tiles"]),
                "X-Model": service.name})
        density_png = out.pop("density_png", None)
        out.update(model=service.name, description=service.description, tiling=service.tiling,
                   device=service.device)
        if density_png is not None:
            out["density_png"] = density_png
        return JSONResponse(out)

    return app


# ----------------------------------------------------------------------------- running it
@contextmanager
def running(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
            **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields its base URL
    (``port=0``: a free port).  For tests and notebooks."""
    import uvicorn

    cfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, **config)
    server = uvicorn.Server(cfg)
    sock = cfg.bind_socket()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="deepcount-uvicorn")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield service_url(host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def service_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


__all__ = ["ServeSettings", "create_app", "parse_size", "running", "service_url"]
