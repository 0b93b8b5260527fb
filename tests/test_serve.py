"""deepcount.serve: the HTTP API, its limits, and the server under load.

The real model counts a 384x512 crop (one tile) of a real ShanghaiTech B photo wherever a
count is checked; a stub Counter whose ``count`` blocks on a ``threading.Event`` makes the
saturation (503) and timeout (504) cases deterministic.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

with warnings.catch_warnings():  # newer Starlette asks for httpx2; httpx is what is installed
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

from deepcount import Counter, CountResult
from deepcount.images import image_size, load_image
from deepcount.pictures import overlay
from deepcount.serve import ServeSettings, create_app, parse_size, running


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def crop_jpeg(photo_path: Path) -> bytes:
    """The top-left 384x512 of IMG_1.jpg (people in it), as a JPEG: one tile."""
    with Image.open(photo_path) as im:
        buf = io.BytesIO()
        im.crop((0, 0, 512, 384)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def reference(counter: Counter, crop_jpeg: bytes) -> float:
    """Counter.count on the very bytes the server is sent."""
    return counter.count(crop_jpeg).count


@pytest.fixture(scope="module")
def client(counter: Counter):
    with TestClient(create_app(counter, ServeSettings(max_concurrency=1, queue=4, timeout=120))) as c:
        yield c


@pytest.fixture(scope="module")
def small_png() -> bytes:
    """A real 64x48 piece of photo-like data for the stub (decodes in no time)."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A ~100-byte PNG whose (CRC-correct) IHDR claims ``width x height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


class StubCounter:
    """Counter-like: counts 42.5 in anything, optionally blocking until ``release`` is set or
    raising ``error``."""

    name = "stub"
    description = "stub: a test double, not a model"
    tiling = "pad"
    device = "cpu"

    def __init__(self, block: bool = False, error: Exception | None = None):
        self.block = block
        self.error = error
        self.release = threading.Event()
        self.calls = 0
        self._lock = threading.Lock()

    def count(self, image, density=None) -> CountResult:
        with self._lock:
            self.calls += 1
        if self.block and not self.release.wait(timeout=60):
            raise RuntimeError("stub was never released")
        if self.error is not None:
            raise self.error
        h, w = image.shape[:2]
        return CountResult("<stub>", 42.5, (h, w), 1, 0.001, None, [42.5])


def post(client, data: bytes, name: str = "photo.jpg", **kw):
    return client.post("/v1/count", files={"image": (name, data, "application/octet-stream")}, **kw)


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ----------------------------------------------------------------------------- the API, real model
def test_count_equals_counter_count_exactly(client, crop_jpeg, reference, counter):
    r = post(client, crop_jpeg)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == reference  # exactly: the same computation on the same bytes
    assert body["tiles"] == 1
    assert (body["height"], body["width"]) == (384, 512)
    assert 0 < body["seconds"] < 120
    assert body["model"] == counter.name
    assert body["description"] == counter.description
    assert "baseline" in body["description"].lower()  # the default model says what it is
    assert body["tiling"] == counter.tiling
    assert "density_png" not in body


def test_density_png_is_the_overlay_at_photo_size(client, crop_jpeg, counter, reference):
    r = post(client, crop_jpeg, params={"density": "1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == reference
    png = base64.b64decode(body["density_png"], validate=True)
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        assert im.size[1] == 384 and im.size[0] > 512  # the photo's size, then its colour bar
        got = np.asarray(im.convert("RGB"))
    direct = counter.count(crop_jpeg, density=1)
    expected = overlay(load_image(crop_jpeg), direct.density, direct.count)
    assert np.array_equal(got, expected)
    # and it is not just the photo: the heat map changed pixels well away from the label
    photo = load_image(crop_jpeg).astype(int)
    assert np.abs(got[100:, :512].astype(int) - photo[100:]).mean() > 1.0


def test_regions_are_counted_as_counter_counts_them(client, crop_jpeg, counter):
    zones = {"left": [[0, 0], [256, 0], [256, 384], [0, 384]], "corner": [[300, 200], [512, 200], [512, 384]]}
    r = post(client, crop_jpeg, params={"region": json.dumps(zones), "density": "1"})
    assert r.status_code == 200, r.text
    body = r.json()
    from deepcount.regions import parse_regions

    direct = counter.count(crop_jpeg, regions=parse_regions(json.dumps(zones)))
    assert body["count"] == direct.count
    assert body["regions"].keys() == zones.keys()
    for name in zones:
        assert body["regions"][name] == pytest.approx(direct.regions[name], rel=1e-9)
    png = base64.b64decode(body["density_png"], validate=True)
    with Image.open(io.BytesIO(png)) as im:
        assert (np.asarray(im.convert("RGB"))[:, :512] == (0, 255, 255)).all(-1).sum() > 300  # outlined
    bad = post(client, crop_jpeg, params={"region": "[[0, 0], [1, 1]]"})
    assert bad.status_code == 422 and "region: " in bad.json()["detail"]


def test_openapi_schema(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    assert "multipart/form-data" in r.json()["paths"]["/v1/count"]["post"]["requestBody"]["content"]


def test_healthz(client, counter):
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["model"] == counter.name
    assert body["device"] == "cpu"


def test_index_page_is_offline(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for ident in ("file", "submit", "count", "overlay", "error"):
        assert f'id="{ident}"' in html
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in html
        a = client.get(asset)
        assert a.status_code == 200 and a.content
        assert b"http://" not in a.content and b"https://" not in a.content


def test_not_an_image_is_422(client):
    r = post(client, b"just some text, not a photo\n", name="notes.txt")
    assert r.status_code == 422
    assert r.json()["detail"] == "not a usable image: not a recognised image format"


def test_truncated_jpeg_is_422(client, crop_jpeg):
    r = post(client, crop_jpeg[: len(crop_jpeg) // 2])
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "truncated" in detail, detail


def test_malformed_requests(client, crop_jpeg):
    r = client.post("/v1/count", files={"photo": ("a.jpg", crop_jpeg)})
    assert r.status_code == 422 and "no field 'image'" in r.json()["detail"]
    r = client.post("/v1/count", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 415 and "multipart" in r.json()["detail"]
    r = post(client, b"")
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = post(client, crop_jpeg, params={"density": "maybe"})
    assert r.status_code == 422 and "density" in r.json()["detail"]


# ----------------------------------------------------------------------------- limits
def test_too_many_bytes_is_413(small_png):
    stub = StubCounter()
    limit = 10_000
    with TestClient(create_app(stub, ServeSettings(max_upload_bytes=limit))) as c:
        big = small_png + b"\0" * (limit + 1 - len(small_png))  # the file one byte over
        r = post(c, big)
        assert r.status_code == 413
        assert r.json()["detail"] == f"upload of {limit + 1:,} bytes exceeds the limit of {limit:,} bytes"

        r = c.post("/v1/count", content=big, headers={"content-type": "image/jpeg"})  # raw body
        assert r.status_code == 413  # from its Content-Length (see the socket test below)
        assert r.json()["detail"] == f"upload of {limit + 1:,} bytes exceeds the limit of {limit:,} bytes"

        def chunks():  # no Content-Length (chunked): refused while reading
            for _ in range(20):
                yield b"\xff" * 1000
        r = c.post("/v1/count", content=chunks(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 413
        assert r.json()["detail"] == f"upload exceeds the limit of {limit:,} bytes"

        ok = post(c, small_png)  # under the limit: fine
        assert ok.status_code == 200 and ok.json()["count"] == 42.5
    assert stub.calls == 1


def test_content_length_refused_before_the_body_is_sent(small_png):
    """A real server answers 413 from the headers alone: this client never sends a body."""
    stub = StubCounter()
    with running(create_app(stub, ServeSettings(max_upload_bytes=1_000_000))) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/count HTTP/1.1\r\nHost: test\r\n"
                      b"Content-Type: multipart/form-data; boundary=x\r\n"
                      b"Content-Length: 5000000000\r\n\r\n")
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                part = s.recv(4096)
                if not part:
                    break
                reply += part
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), reply
        assert b"exceeds the limit of 1,000,000 bytes" in body
    assert stub.calls == 0


def test_too_many_pixels_is_413_without_decoding():
    stub = StubCounter()
    data = bomb_png()
    assert len(data) < 200
    assert image_size(data) == (20000, 20000)  # the header really says so
    with TestClient(create_app(stub, ServeSettings(max_pixels=25_000_000))) as c:
        r = post(c, data, name="bomb.png")
    assert r.status_code == 413
    assert r.json()["detail"] == ("image of 20000x20000 = 400,000,000 pixels exceeds the limit "
                                  "of 25,000,000 pixels")
    assert stub.calls == 0  # refused from the header: no slot taken, nothing decoded


def test_saturated_answers_503_with_retry_after(small_png):
    stub = StubCounter(block=True)
    settings = ServeSettings(max_concurrency=1, queue=1, timeout=60)
    with TestClient(create_app(stub, settings)) as c, ThreadPoolExecutor(3) as pool:
        health = lambda: c.get("/healthz").json()  # noqa: E731
        try:
            first = pool.submit(post, c, small_png)
            wait_until(lambda: health()["counting"] == 1, what="the first request to count")
            second = pool.submit(post, c, small_png)
            wait_until(lambda: health()["waiting"] == 1, what="the second request to wait")
            start = time.monotonic()
            third = pool.submit(post, c, small_png).result(timeout=5)  # at once, never queued
            assert time.monotonic() - start < 5
            assert third.status_code == 503
            assert "busy" in third.json()["detail"]
            assert int(third.headers["retry-after"]) >= 1
            assert stub.calls == 1  # only the first one is counting
        finally:
            stub.release.set()
        assert first.result(30).status_code == 200
        assert second.result(30).status_code == 200
        assert health() == {"status": "ok", "model": "stub", "device": "cpu", "counting": 0,
                            "waiting": 0}
    assert stub.calls == 2


def test_timeout_is_504_and_the_slot_stays_busy_until_the_work_ends(small_png):
    stub = StubCounter(block=True)
    settings = ServeSettings(max_concurrency=1, queue=1, timeout=0.5)
    with TestClient(create_app(stub, settings)) as c:
        try:
            start = time.monotonic()
            r = post(c, small_png)
            assert r.status_code == 504
            assert 0.4 < time.monotonic() - start < 10
            assert "stops at its next batch of tiles" in r.json()["detail"]
            assert c.get("/healthz").json()["counting"] == 1  # a stand-in without deadlines still runs
            r = post(c, small_png)  # no slot frees up within its own timeout
            assert r.status_code == 504
            assert "waiting for a free counting slot" in r.json()["detail"]
        finally:
            stub.release.set()
        wait_until(lambda: c.get("/healthz").json()["counting"] == 0, what="the slot to free")
        r = post(c, small_png)
        assert r.status_code == 200 and r.json()["count"] == 42.5
    assert stub.calls == 2


def test_model_error_is_500_with_the_message_and_frees_the_slot(small_png):
    stub = StubCounter(error=RuntimeError("weights exploded"))
    with TestClient(create_app(stub, ServeSettings(max_concurrency=1, queue=0))) as c:
        r = post(c, small_png)
        assert r.status_code == 500
        assert r.json()["detail"] == "counting failed: RuntimeError: weights exploded"
        assert c.get("/healthz").json()["counting"] == 0
        stub.error = None
        assert post(c, small_png).status_code == 200  # queue=0, one slot: it was freed


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_out_of_memory_is_500_saying_so_and_frees_the_slot(small_png, error):
    stub = StubCounter(error=error)
    with TestClient(create_app(stub, ServeSettings(max_concurrency=1, queue=0))) as c:
        r = post(c, small_png)
        assert r.status_code == 500 and r.json()["detail"] == "counting failed: out of memory"
        stub.error = None
        assert post(c, small_png).status_code == 200


def test_raw_body_and_png_format(small_png):
    stub = StubCounter()
    with TestClient(create_app(stub)) as c:
        r = c.post("/v1/count", content=small_png, headers={"content-type": "image/png"},
                   params={"density": "1", "format": "png"})
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/png"
        assert float(r.headers["x-count"]) == 42.5
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.size == (64, 48)


def test_density_asked_of_a_model_without_maps_is_400(small_png):
    stub = StubCounter()
    stub.density_branches = ()  # as Counter reports for a count-only model
    with TestClient(create_app(stub)) as c:
        r = post(c, small_png, params={"density": "1"})
        assert r.status_code == 400 and "no density map" in r.json()["detail"]
        assert post(c, small_png).status_code == 200
    assert stub.calls == 1


def test_settings_and_sizes():
    assert parse_size("20MB") == 20_000_000
    assert parse_size("20MiB") == 20 * 1024 * 1024
    assert parse_size("512kb") == 512_000
    assert parse_size("1048576") == 1048576
    for bad in ("", "MB", "-1MB", "20XB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        ServeSettings(max_concurrency=0)
    with pytest.raises(ValueError):
        ServeSettings(queue=-1)
    with pytest.raises(ValueError):
        ServeSettings(timeout=0)


# ----------------------------------------------------------------------------- under load
def _start_cli_server(*args: str, timeout: float = 60.0) -> tuple[subprocess.Popen, str, list[str]]:
    """``deepcount serve --port 0 ...`` in a subprocess; its URL and the lines it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "deepcount.cli", "serve", "--host", "127.0.0.1",
                             "--port", "0", "--model", "csrnet-baseline", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line.rstrip())
        if line.startswith("serving on "):
            return proc, line.split()[2].rstrip("/"), seen
    proc.kill()
    proc.wait(10)
    raise AssertionError("deepcount serve did not start:\n" + "\n".join(seen))


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _burst(url: str, data: bytes, clients: int, requests: int
           ) -> tuple[list[tuple[int, dict, dict]], float]:
    """``clients`` httpx clients start at once and send ``requests`` in all, each client its
    share one after another (on one keep-alive connection)."""
    barrier = threading.Barrier(clients)
    shares = [requests // clients + (i < requests % clients) for i in range(clients)]

    def run(share: int) -> list[tuple[int, dict, dict]]:
        out = []
        with httpx.Client(base_url=url, timeout=httpx.Timeout(300, connect=10)) as http:
            barrier.wait(30)
            for _ in range(share):
                start = time.perf_counter()
                r = http.post("/v1/count", files={"image": ("crop.jpg", data, "image/jpeg")})
                headers = dict(r.headers)
                headers["x-test-latency"] = time.perf_counter() - start
                out.append((r.status_code, r.json(), headers))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(run, share) for share in shares]
        results = [item for f in futures for item in f.result(timeout=600)]
    return results, time.perf_counter() - start


def test_load_real_server(crop_jpeg, reference, capsys):
    """The CLI server, real model: every request accepted, no 5xx, every count the same."""
    # 12 one-tile requests keep the suite fast on two CPU cores; raise them for a longer run.
    clients = int(os.environ.get("DEEPCOUNT_LOAD_CLIENTS", "8"))
    total = int(os.environ.get("DEEPCOUNT_LOAD_REQUESTS", "12"))
    proc, url, printed = _start_cli_server("--device", "cpu", "--max-concurrency", "2",
                                           "--queue", str(clients), "--timeout", "300",
                                           "--log-level", "warning")
    try:
        assert any(line.startswith("model: csrnet-baseline") for line in printed), printed
        assert any("baseline" in line and line.startswith("warning:") for line in printed), printed
        assert httpx.get(url + "/healthz", timeout=10).json()["status"] == "ok"
        results, seconds = _burst(url, crop_jpeg, clients, total)
    finally:
        _stop(proc)
    statuses = [s for s, _, _ in results]
    assert len(results) == total
    assert not [s for s in statuses if s >= 500], statuses
    assert statuses == [200] * len(results)
    counts = {body["count"] for _, body, _ in results}
    assert counts == {reference}, counts  # the same bytes always count the same
    model_seconds = sorted(body["seconds"] for _, body, _ in results)
    latency = sorted(headers["x-test-latency"] for _, _, headers in results)
    with capsys.disabled():
        print(f"\n[load] {total} requests from {clients} concurrent clients (2 counting, queue "
              f"{clients}): {seconds:.1f} s, {total / seconds:.2f} req/s; model time per request "
              f"median {model_seconds[len(model_seconds) // 2]:.2f} s; latency median "
              f"{latency[len(latency) // 2]:.1f} s, max {latency[-1]:.1f} s")


def test_burst_against_a_saturated_server(counter, crop_jpeg, reference, capsys):
    """One slot and one place in the queue, eight clients at once: 200s and prompt 503s only."""
    clients = 8
    app = create_app(counter, ServeSettings(max_concurrency=1, queue=1, timeout=120))
    with running(app) as url:
        results, seconds = _burst(url, crop_jpeg, clients, clients)  # one each
        health = httpx.get(url + "/healthz", timeout=10).json()
    statuses = sorted(s for s, _, _ in results)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert {body["count"] for s, body, _ in results if s == 200} == {reference}
    for s, body, headers in results:
        if s == 503:
            assert int(headers["retry-after"]) >= 1 and "busy" in body["detail"]
    assert (health["counting"], health["waiting"]) == (0, 0)
    with capsys.disabled():
        print(f"\n[burst] {clients} clients at once against 1 slot + 1 queued: "
              f"{statuses.count(200)} x 200, {statuses.count(503)} x 503 in {seconds:.1f} s")


# ----------------------------------------------------------------------------- issue 16: work bounds
def test_a_thin_strip_is_413_for_its_tiles_before_admission():
    """A 1x25,000,000 PNG passes the 25-megapixel limit but is 48,829 tiles."""
    stub = StubCounter()
    with TestClient(create_app(stub)) as c:
        r = post(c, bomb_png(25_000_000, 1), "strip.png")
        assert r.status_code == 413 and "48,829 tiles" in r.json()["detail"] and "limit of 256" in r.json()["detail"]
    stub.tiling = "grid"  # the authors' resize: 1x1,000,000 -> 1 x 1,953 tiles (and a 384 x 1,000k image)
    with TestClient(create_app(stub)) as c:
        r = post(c, bomb_png(1_000_000, 1), "strip.png")
        assert r.status_code == 413 and "1,953 tiles" in r.json()["detail"]
        assert c.get("/healthz").json()["waiting"] == 0
    assert stub.calls == 0


def test_slow_uploads_hold_no_counting_place(small_png):
    """Ten senders trickling a 100 KB body take none of the 1 + 1 counting places."""
    stub = StubCounter()
    settings = ServeSettings(max_concurrency=1, queue=1, upload_timeout=3.0)
    with running(create_app(stub, settings)) as url:
        host, port = url.removeprefix("http://").split(":")
        slow = []
        for _ in range(10):
            s = socket.create_connection((host, int(port)), timeout=20)
            s.sendall(b"POST /v1/count HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 100000\r\n\r\n\x89")
            slow.append(s)
        try:
            import httpx

            time.sleep(0.3)
            r = httpx.post(url + "/v1/count", files={"image": ("a.png", small_png, "image/png")}, timeout=20)
            assert r.status_code == 200 and r.json()["count"] == 42.5
            reply = slow[0].recv(4096)  # after its own deadline, the trickle gets 408
            assert reply.startswith(b"HTTP/1.1 408"), reply
        finally:
            for s in slow:
                s.close()


def test_counting_stops_when_its_request_times_out(tmp_path):
    """A real Counter stops within a batch of tiles once its request has timed out, and its
    slot is free again long before the whole image would have been counted."""
    import torch

    from deepcount import Counter
    from deepcount.model import DeepCount

    torch.manual_seed(0)
    counter = Counter(DeepCount(width=0.125).eval(), {"name": "small"}, torch.device("cpu"), "pad", batch_size=1)
    buf = io.BytesIO()
    Image.fromarray(np.full((3072, 4096, 3), 90, np.uint8)).save(buf, format="JPEG")  # 64 tiles
    start = time.monotonic()
    counter.count(np.full((384, 512 * 8, 3), 90, np.uint8))
    per_tile = (time.monotonic() - start) / 8
    with TestClient(create_app(counter, ServeSettings(max_concurrency=1, queue=1, timeout=0.3))) as c:
        start = time.monotonic()
        r = post(c, buf.getvalue(), "big.jpg")
        assert r.status_code == 504
        wait_until(lambda: c.get("/healthz").json()["counting"] == 0, timeout=64 * per_tile, what="the slot")
        assert time.monotonic() - start < 0.3 + 20 * per_tile + 2  # not 64 tiles' worth
