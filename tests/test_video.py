"""`deepcount video` and `count_video` on a real video: 12 consecutive Mall frames (640x480, one
surveillance camera) written to an mp4v file at 10 fps."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

cv2 = pytest.importorskip("cv2")

from deepcount.cli import main  # noqa: E402
from deepcount.model import DeepCount  # noqa: E402
from deepcount.predict import Counter  # noqa: E402
from deepcount.video import (FrameCount, VideoRun, VideoSourceError, count_video,  # noqa: E402
                             parse_source, source_stem)

FPS = 10
N_FRAMES = 12


@pytest.fixture(scope="module")
def mall_video(tmp_path_factory, data_root: Path) -> Path:
    frames = data_root / "mall_dataset" / "frames"
    path = tmp_path_factory.mktemp("video") / "mall.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (640, 480))
    assert writer.isOpened()
    for i in range(1, N_FRAMES + 1):
        frame = cv2.imread(str(frames / f"seq_{i:06d}.jpg"))
        assert frame is not None and frame.shape == (480, 640, 3)
        writer.write(frame)
    writer.release()
    return path


def decoded_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a video as OpenCV decodes it, converted to RGB."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


@pytest.fixture(scope="module")
def api_counts(counter: Counter, mall_video: Path) -> list[FrameCount]:
    return count_video(counter, mall_video, every=4, progress=False)


@pytest.fixture
def tiny() -> Counter:
    torch.manual_seed(0)
    return Counter(DeepCount(width=0.125).eval(), {"name": "tiny", "description": "untrained test model"},
                   torch.device("cpu"))


def test_count_video_indices_times_and_counts(counter, mall_video, api_counts):
    frames = decoded_frames(mall_video)
    assert len(frames) == N_FRAMES
    assert [c.frame for c in api_counts] == [0, 4, 8]
    assert [c.time_s for c in api_counts] == pytest.approx([0.0, 0.4, 0.8], abs=1e-9)
    for c in api_counts:
        expected = counter.count(frames[c.frame]).count
        assert c.count == pytest.approx(expected, rel=1e-6)
    # three different frames were counted, not one frame three times
    assert len({round(c.count, 6) for c in api_counts}) == 3
    assert all(5 < c.count < 100 for c in api_counts)  # Mall frames hold ~15-50 people


def test_cli_writes_csv_plot_and_annotated_video(mall_video, api_counts, tmp_path, capsys):
    out = tmp_path / "out"
    annotated, plot = out / "annotated.mp4", tmp_path / "plots" / "counts.png"
    rc = main(["video", str(mall_video), "--model", "csrnet-baseline", "--every", "4", "--out", str(out), "--output", str(annotated),
               "--plot", str(plot), "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err.startswith("model: csrnet-baseline: ")
    assert "frames read     12" in captured.out
    assert "frames counted  3" in captured.out

    with open(out / "mall_counts.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["frame", "time_s", "count"]
    assert [int(r[0]) for r in rows[1:]] == [0, 4, 8]
    assert [float(r[1]) for r in rows[1:]] == pytest.approx([0.0, 0.4, 0.8])
    assert [float(r[2]) for r in rows[1:]] == pytest.approx([c.count for c in api_counts], abs=1e-3)

    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as im:
        assert im.size == (800, 400)
        assert len(np.unique(np.asarray(im.convert("L")))) > 20  # a drawn plot, not a blank page

    cap = cv2.VideoCapture(str(annotated))
    assert cap.isOpened()
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(FPS / 4)
    cap.release()
    written = decoded_frames(annotated)
    assert len(written) == 3
    assert all(f.shape == (480, 640, 3) for f in written)
    source = decoded_frames(mall_video)
    for frame, c in zip(written, [0, 4, 8]):
        assert frame[0:4, 0:80].mean() < 40  # the black label box in the corner, above its text
        # the density overlay changes the picture (mp4v re-encoding alone changes it by ~2)
        assert np.abs(frame[60:].astype(float) - source[c][60:]).mean() > 4


def test_cli_max_frames_stops_early(mall_video, tmp_path, capsys):
    rc = main(["video", str(mall_video), "--model", "csrnet-baseline", "--max-frames", "1", "--out", str(tmp_path), "--quiet",
               "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "frames read     1\n" in captured.out
    with open(tmp_path / "mall_counts.csv", newline="") as f:
        assert len(list(csv.reader(f))) == 2


def test_max_frames_with_every(tiny, mall_video):
    with VideoRun(tiny, mall_video, every=3, max_frames=2, progress=False) as run:
        counts = list(run)
    assert [c.frame for c in counts] == [0, 3]
    assert run.frames_read == 4  # stops right after the second counted frame
    assert run.fps == FPS and run.fps_reported and run.frame_count == N_FRAMES


@pytest.mark.parametrize("kind", ["missing", "garbage", "folder"])
def test_cli_bad_source_exit_2(kind, tmp_path, capfd):
    if kind == "missing":
        source = tmp_path / "nope.mp4"
    elif kind == "garbage":
        source = tmp_path / "notes.mp4"
        source.write_text("these are meeting notes, not a video\n" * 20)
    else:
        source = tmp_path
    rc = main(["video", str(source), "--out", str(tmp_path / "out")])
    out, err = capfd.readouterr()  # file-descriptor level: FFmpeg's own messages included
    assert rc == 2
    assert err.startswith(f"error: cannot open video source '{source}': ")
    assert err.count("\n") == 1  # one line, no traceback, no library noise
    assert out == ""
    assert not (tmp_path / "out").exists()


def test_missing_webcam_fails_cleanly():
    proc = subprocess.run([sys.executable, "-m", "deepcount.cli", "video", "7", "--max-frames", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot open video source webcam 7: no camera at index 7")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_api_bad_source_raises(tiny, tmp_path):
    with pytest.raises(VideoSourceError, match="no such file"):
        count_video(tiny, tmp_path / "nope.mp4")


def test_cli_rejects_every_0(mall_video, capsys):
    with pytest.raises(SystemExit) as e:
        main(["video", str(mall_video), "--every", "0"])
    assert e.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_counting_alone_runs_no_branch(tiny, mall_video, tmp_path):
    calls: list[str] = []
    for name, branch in tiny.model.branches.items():
        branch.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    plain = count_video(tiny, mall_video, every=4, progress=False)
    assert [c.frame for c in plain] == [0, 4, 8]
    assert calls == []
    # the hooks do see branches when an annotated video asks for the map: branch 1 only,
    # once per forward batch of the 4 tiles of a 640x480 frame; the counts do not change
    annotated = count_video(tiny, mall_video, every=4, progress=False, output=tmp_path / "a.mp4")
    assert calls == ["1"] * (3 * math.ceil(4 / tiny.batch_size))
    assert [c.count for c in annotated] == pytest.approx([c.count for c in plain], rel=1e-6)
    cap = cv2.VideoCapture(str(tmp_path / "a.mp4"))
    assert cap.get(cv2.CAP_PROP_FRAME_COUNT) == 3
    cap.release()


def test_a_repeated_frame_takes_the_last_result_without_the_network(tiny, data_root, tmp_path):
    # a Motion-JPEG camera that freezes: frames 1, 1, 1, 2, 2, 1 of Mall (each frame its own
    # JPEG, so a repeated frame can decode to the same pixels; an MPEG codec's differ a little)
    frames = data_root / "mall_dataset" / "frames"
    order = [1, 1, 1, 2, 2, 1]
    path = tmp_path / "frozen.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (640, 480))
    for i in order:
        writer.write(cv2.imread(str(frames / f"seq_{i:06d}.jpg")))
    writer.release()
    decoded = decoded_frames(path)
    same = [i > 0 and np.array_equal(decoded[i], decoded[i - 1]) for i in range(len(decoded))]
    calls: list[int] = []
    tiny.model.backbone.register_forward_hook(lambda m, i, o: calls.append(1))
    with VideoRun(tiny, path, progress=False) as run:
        counts = [c.count for c in run]
    assert run.reused == sum(same) and len(calls) == (len(order) - sum(same)) * math.ceil(4 / tiny.batch_size)
    assert sum(same) >= 1  # (the encoder's rate control may still change the first repeats a little)
    # every frame's count is what counting it alone gives
    for rgb, count in zip(decoded, counts):
        assert count == pytest.approx(tiny.count(rgb).count, rel=1e-6)


def test_ctrl_c_keeps_what_was_counted(tiny, mall_video, tmp_path, monkeypatch, capsys):
    class Interrupting(Counter):
        calls = 0

        def count(self, images, density=None):
            type(self).calls += 1
            if type(self).calls == 3:
                raise KeyboardInterrupt
            return super().count(images, density)

    monkeypatch.setattr(Counter, "load", classmethod(
        lambda cls, *a, **k: Interrupting(tiny.model, tiny.info, tiny.device)))
    rc = main(["video", str(mall_video), "--out", str(tmp_path), "--output",
               str(tmp_path / "a.mp4"), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 130
    assert "interrupted" in captured.err and "frames counted  2" in captured.out
    with open(tmp_path / "mall_counts.csv", newline="") as f:
        assert [r[0] for r in csv.reader(f)] == ["frame", "0", "1"]
    cap = cv2.VideoCapture(str(tmp_path / "a.mp4"))  # finalised: it opens and holds both frames
    assert cap.isOpened() and cap.get(cv2.CAP_PROP_FRAME_COUNT) == 2
    cap.release()


def test_sources_and_stems():
    assert parse_source("0") == 0 and parse_source(3) == 3
    assert parse_source("clip.mp4") == "clip.mp4" and parse_source(Path("a/b.avi")) == "a/b.avi"
    assert source_stem("videos/mall cam.mp4") == "mall_cam"
    assert source_stem(0) == "camera0"
    assert source_stem("rtsp://10.0.0.5:554/live/cam1.sdp") == "cam1"
    assert source_stem("http://example.org/") == "example.org"


def test_regions_over_time(counter: Counter, mall_video, tmp_path, capsys):
    """`video --region`: a column per region in the CSV, each the region count of that frame as
    Counter.count gives it, and a usage error for a bad region file."""
    zones = {"entrance": [[0, 0], [320, 0], [320, 480], [0, 480]], "fountain": [[200, 150], [450, 150], [450, 400]]}
    (tmp_path / "zones.json").write_text(json.dumps(zones))
    rc = main(["video", str(mall_video), "--model", "csrnet-baseline", "--every", "6", "--region",
               str(tmp_path / "zones.json"), "--out", str(tmp_path), "--plot", str(tmp_path / "plot.png"),
               "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    with open(tmp_path / "mall_counts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["frame", "time_s", "count", "region:entrance", "region:fountain"]
    frames = decoded_frames(mall_video)
    for row in rows:
        got = counter.count(frames[int(row["frame"])], regions=tmp_path / "zones.json")
        assert float(row["count"]) == pytest.approx(got.count, abs=1e-3)
        for name in zones:
            assert float(row[f"region:{name}"]) == pytest.approx(got.regions[name]["scaled"], abs=1e-3)
        assert 0 < float(row["region:fountain"]) < float(row["region:entrance"]) < float(row["count"])
    (tmp_path / "bad.json").write_text('{"a": [[0, 0]]}')
    assert main(["video", str(mall_video), "--region", str(tmp_path / "bad.json")]) == 2
    assert "error: --region:" in capsys.readouterr().err
