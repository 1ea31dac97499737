"""Frame sources with real parts: the real clip, real images, a real RTSP server (GStreamer)
and a real HTTP MJPEG server on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pytest
import skimage.data

from edged.config import SourceConfig
from edged.errors import EdgedError
from edged.frame import Frame
from edged.sources import FrameReader, ImageCapture, make_capture, redact, to_bgr

if TYPE_CHECKING:
    from helpers.mjpeg_server import MjpegServer
    from helpers.rtsp_server import RtspServer

# The fixtures rtsp_server, rtsp_clip_server, mjpeg_server and make_mjpeg_server.
pytest_plugins = ["helpers.rtsp_server", "helpers.mjpeg_server"]

BIKES_FRAMES = 250
# Network tests: short timeouts and backoff so losing and regaining a stream takes seconds.
FAST_NET = {"open_timeout": 3.0, "read_timeout": 1.0, "reconnect_max": 1.0}


class StateLog:
    """Records ``on_state`` calls and lets a test wait for a state."""

    def __init__(self) -> None:
        self.states: list[tuple[str, str]] = []
        self._cond = threading.Condition()

    def __call__(self, state: str, detail: str) -> None:
        with self._cond:
            self.states.append((state, detail))
            self._cond.notify_all()

    def names(self) -> list[str]:
        return [state for state, _ in self.states]

    def wait_for(self, state: str, timeout: float, after: int = 0) -> bool:
        """Whether ``state`` is reported (as the ``after``-th entry or later) within timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: state in self.names()[after:], timeout)


def read_all(reader: FrameReader, limit: int = 10_000, timeout: float = 5.0) -> list[Frame]:
    """Every frame until the reader has no more (or ``limit`` frames)."""
    frames = []
    while len(frames) < limit:
        frame = reader.get(timeout)
        if frame is None:
            break
        frames.append(frame)
    return frames


def first_frames(path: Path, count: int) -> list[np.ndarray]:
    """The first ``count`` decoded frames of a clip, straight from OpenCV."""
    capture = cv2.VideoCapture(str(path))
    images = [capture.read()[1] for _ in range(count)]
    capture.release()
    return images


def started(config: SourceConfig) -> tuple[FrameReader, StateLog]:
    log = StateLog()
    reader = FrameReader(config, on_state=log)
    reader.start()
    return reader, log


# -- files, images, folders -----------------------------------------------------------------


def test_file_fast_mode_yields_every_frame_in_order(bikes_clip: Path) -> None:
    reader, log = started(SourceConfig(uri=str(bikes_clip), realtime=False))
    frames = read_all(reader)
    assert [f.index for f in frames] == list(range(BIKES_FRAMES))
    assert all(f.image.shape == (272, 640, 3) and f.image.dtype == np.uint8 for f in frames)
    assert np.array_equal(frames[0].image, first_frames(bikes_clip, 1)[0])
    assert reader.state == "ended" and reader.get(0.1) is None
    assert (reader.frames, reader.drops, reader.bad_frames) == (BIKES_FRAMES, 0, 0)
    assert log.names() == ["opening", "streaming", "ended"]
    assert "640x272 @ 25 fps, 250 frames" in log.states[1][1] and reader.source_fps == 25
    reader.stop()
    assert reader.state == "stopped" and log.names()[-1] == "stopped"


def test_file_realtime_mode_paces_at_the_file_rate(bikes_clip: Path) -> None:
    reader, _ = started(SourceConfig(uri=str(bikes_clip), realtime=True))
    first = reader.get(5.0)
    assert first is not None
    frames = [reader.get(2.0) for _ in range(25)]
    elapsed = frames[-1].mono_time - first.mono_time
    rate = reader.fps
    reader.stop()
    # 25 frames at 25 fps take 1 s; loose bounds for a noisy machine.
    assert 0.7 < elapsed < 1.6, elapsed
    assert 17 < rate < 33, rate
    assert reader.drops == 0  # the consumer keeps up
    assert reader.decoded == reader.frames  # and gets every frame decoded


def test_file_loop_starts_again_with_increasing_indices(bikes_clip: Path) -> None:
    reader, log = started(SourceConfig(uri=str(bikes_clip), realtime=False, loop=True))
    frames = read_all(reader, limit=BIKES_FRAMES + 10)
    reader.stop()
    assert [f.index for f in frames] == list(range(BIKES_FRAMES + 10))
    # The frame after the last one is the first one again.
    assert np.array_equal(frames[BIKES_FRAMES].image, frames[0].image)
    assert "ended" not in log.names()


def test_slow_consumer_of_a_paced_source_counts_drops(bikes_clip: Path) -> None:
    reader, _ = started(SourceConfig(uri=str(bikes_clip), realtime=True))
    taken = []
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        frame = reader.get(1.0)
        assert frame is not None
        taken.append(frame.index)
        time.sleep(0.2)  # a consumer at 5 fps behind a 25 fps source
    reader.stop()
    assert taken == sorted(taken) and len(set(taken)) == len(taken)
    assert reader.drops >= 10, reader.drops
    # Every frame read was either taken, dropped or is still waiting in the slot.
    assert reader.frames - reader.drops - len(taken) in (0, 1)


def test_frames_a_slow_consumer_will_not_take_are_not_decoded(bikes_clip: Path) -> None:
    # A consumer at 5 frames/s behind a 25 frames/s source: once its pace is known, only the
    # frames due just before its next take are decoded, and what it takes is as fresh as ever.
    reader, _ = started(SourceConfig(uri=str(bikes_clip), realtime=True))
    ages = []
    for take in range(20):
        frame = reader.get(1.0)
        assert frame is not None
        ages.append(time.monotonic() - frame.mono_time)
        if take == 7:  # the pace is known (5 takes) and settled
            frames, decoded = reader.frames, reader.decoded
        time.sleep(0.2)
    frames, decoded = reader.frames - frames, reader.decoded - decoded
    reader.stop()
    assert frames >= 40, frames  # 12 takes x 5 frames, on a noisy machine
    assert decoded <= 0.6 * frames, (decoded, frames)  # about 2 of 5 here
    assert decoded >= 12  # every take had its frame decoded
    assert sorted(ages)[len(ages) // 2] < 0.04, ages  # median age within a frame period


def test_still_image_gives_one_frame_then_ends(tmp_path: Path) -> None:
    photo = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    path = tmp_path / "astronaut.png"
    cv2.imwrite(str(path), photo)
    reader, log = started(SourceConfig(uri=str(path)))
    frames = read_all(reader, timeout=2.0)
    reader.stop()
    assert len(frames) == 1 and np.array_equal(frames[0].image, photo)
    assert log.names() == ["opening", "streaming", "ended", "stopped"]


def test_still_image_loop_repeats_it(tmp_path: Path) -> None:
    path = tmp_path / "camera.png"
    cv2.imwrite(str(path), skimage.data.camera())  # gray: handed on as 3-channel BGR
    reader, _ = started(SourceConfig(uri=str(path), loop=True))
    frames = read_all(reader, limit=5)
    reader.stop()
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert frames[4].image.shape == (512, 512, 3)
    assert np.array_equal(frames[4].image[:, :, 0], skimage.data.camera())


def test_folder_in_name_order_skipping_bad_images(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    photos = {"b.png": skimage.data.chelsea(), "a.png": skimage.data.astronaut(),
              "c.jpg": skimage.data.coffee()}
    for name, rgb in photos.items():
        cv2.imwrite(str(tmp_path / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (tmp_path / "b2.png").write_bytes(b"not a png at all")  # a bad frame, not fatal
    (tmp_path / "notes.txt").write_text("not an image: ignored")
    reader, log = started(SourceConfig(uri=str(tmp_path), realtime=False))
    frames = read_all(reader, timeout=2.0)
    reader.stop()
    assert [f.image.shape[:2] for f in frames] == [(512, 512), (300, 451), (400, 600)]
    assert [f.index for f in frames] == [0, 1, 2]
    assert reader.bad_frames == 1
    assert "ended" in log.names()
    skipped = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert skipped == [f"source {tmp_path}: b2.png is not a readable image, skipped"]


def test_to_bgr_converts_gray_and_bgra_and_rejects_the_rest() -> None:
    gray = skimage.data.camera()
    assert to_bgr(gray).shape == (512, 512, 3)
    assert to_bgr(gray[:, :, None]).shape == (512, 512, 3)
    bgra = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGRA)
    assert np.array_equal(to_bgr(bgra), bgra[:, :, :3])
    for bad in (None, np.empty((0, 0, 3), np.uint8), np.zeros((4, 4, 2), np.uint8),
                np.zeros((4, 4, 3), np.float32), np.zeros(12, np.uint8)):
        assert to_bgr(bad) is None


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("missing.mp4", None, "no such file or folder"),
    ("photo.jpg", b"\xff\xd8 truncated", "not a readable image"),
    ("clip.mp4", b"plain text, no video", "not a readable video file"),
])
def test_bad_files_give_one_line_errors(tmp_path: Path, name: str, content: bytes | None,
                                        expected: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(EdgedError) as info:
        FrameReader(SourceConfig(uri=str(path))).start()
    message = str(info.value)
    assert "\n" not in message and str(path) in message and expected in message


@pytest.mark.parametrize(("uri", "expected"), [
    ("ftp://user:secret@camera.local/feed", "unknown URI scheme 'ftp'"),
    ("rtsp:///stream", "no host"),
    ("rtsp://camera.local:http/stream", "bad URL (Port could not be cast"),
])
def test_bad_uris_give_one_line_errors(uri: str, expected: str) -> None:
    with pytest.raises(EdgedError) as info:
        make_capture(SourceConfig(uri=uri))
    message = str(info.value)
    assert expected in message and "\n" not in message and "secret" not in message


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(EdgedError, match=f"{tmp_path}: the folder holds no images"):
        make_capture(SourceConfig(uri=str(tmp_path)))


def test_redact_hides_the_password_only() -> None:
    assert redact("rtsp://admin:hunter2@10.0.0.5:554/live") == "rtsp://admin:***@10.0.0.5:554/live"
    assert redact("rtsp://10.0.0.5/live") == "rtsp://10.0.0.5/live"


def test_missing_camera_is_retried_with_backoff() -> None:
    # No /dev/video99 here: a camera that is not plugged in yet is retried, never fatal.
    reader, log = started(SourceConfig(uri="/dev/video99", reconnect_max=0.5))
    assert log.wait_for("reconnecting", 3.0)
    time.sleep(1.3)
    assert reader.reconnects >= 2 and reader.state == "reconnecting"
    assert "/dev/video99: cannot open the V4L2 device" in reader.detail
    reader.stop()
    assert reader.state == "stopped" and reader.get(0.1) is None


# -- network: RTSP and HTTP MJPEG ----------------------------------------------------------------


def test_rtsp_clip_gives_the_clip_frames(rtsp_clip_server: RtspServer, bikes_clip: Path) -> None:
    reader, log = started(SourceConfig(uri=rtsp_clip_server.url, **FAST_NET))
    frames = read_all(reader, limit=10)
    reader.stop()
    assert len(frames) == 10 and log.names()[:2] == ["opening", "streaming"]
    assert frames[0].image.shape == (272, 640, 3)
    # Lossless transport of the clip's own H.264: the first frame decodes as from the file.
    reference = first_frames(bikes_clip, 1)[0]
    assert np.abs(frames[0].image.astype(int) - reference).mean() < 2.0


def test_rtsp_server_restart_reconnects_and_frames_resume(rtsp_server: RtspServer) -> None:
    reader, log = started(SourceConfig(uri=rtsp_server.url, **FAST_NET))
    assert reader.get(5.0) is not None and reader.state == "streaming"
    rtsp_server.stop(kill=True)  # the camera crashes ...
    assert log.wait_for("reconnecting", 5.0)
    lost_at = reader.frames
    time.sleep(1.0)
    rtsp_server.start()  # ... and comes back on the same port
    assert log.wait_for("streaming", 10.0, after=log.names().index("reconnecting"))
    # The slot may still hold the last frame from before the loss: skip to the new ones.
    frame = reader.get(5.0)
    while frame is not None and frame.index < lost_at:
        frame = reader.get(5.0)
    reader.stop()
    assert frame is not None and frame.image.shape == (240, 320, 3)
    assert reader.reconnects >= 1
    assert log.names()[:4] == ["opening", "streaming", "reconnecting", "streaming"]


def test_rtsp_stalled_server_is_detected_and_reopened(rtsp_server: RtspServer) -> None:
    reader, log = started(SourceConfig(uri=rtsp_server.url, **FAST_NET))
    assert reader.get(5.0) is not None
    rtsp_server.freeze()  # connection open, nothing arrives
    assert log.wait_for("reconnecting", 5.0)
    rtsp_server.thaw()
    assert log.wait_for("streaming", 10.0, after=2)
    assert reader.get(5.0) is not None
    reader.stop()


def test_mjpeg_stream_gives_frames(mjpeg_server: MjpegServer, bikes_clip: Path) -> None:
    reader, _ = started(SourceConfig(uri=mjpeg_server.url, **FAST_NET))
    frames = read_all(reader, limit=5)
    reader.stop()
    assert [f.index for f in frames] == sorted({f.index for f in frames}) and len(frames) == 5
    # JPEG is lossy: the frame is close to one of the clip's first frames.
    originals = first_frames(bikes_clip, 25)
    error = min(np.abs(frames[0].image.astype(int) - o).mean() for o in originals)
    assert error < 4.0, error


def jpeg(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def test_mjpeg_server_down_at_start_then_up(make_mjpeg_server: Callable[..., MjpegServer]) -> None:
    server = make_mjpeg_server([jpeg(skimage.data.coffee()), jpeg(skimage.data.chelsea())],
                               start=False)
    reader, log = started(SourceConfig(uri=server.url, **FAST_NET))
    assert log.wait_for("reconnecting", 5.0)
    assert "cannot open the stream" in reader.detail
    server.start()
    assert log.wait_for("streaming", 5.0)
    frame = reader.get(5.0)
    reader.stop()
    assert frame is not None and frame.image.shape in ((400, 600, 3), (300, 451, 3))


def test_frozen_mjpeg_stream_repeating_one_frame_is_reopened(
        make_mjpeg_server: Callable[..., MjpegServer]) -> None:
    server = make_mjpeg_server([jpeg(skimage.data.coffee())])
    reader, log = started(SourceConfig(uri=server.url, **FAST_NET))
    assert reader.get(5.0) is not None
    assert log.wait_for("reconnecting", 4.0)
    reader.stop()
    assert "the same frame for 1 s" in log.states[log.names().index("reconnecting")][1]


def test_frame_time_is_the_grab_so_latency_includes_decoding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame's capture time is taken when it is grabbed; decoding (here a slow one) happens
    after, and shows in the frame's age when the consumer gets it."""
    cv2.imwrite(str(tmp_path / "frame.png"), np.zeros((32, 32, 3), np.uint8))
    decode_started: list[float] = []

    class SlowDecode(ImageCapture):
        def retrieve(self) -> np.ndarray | None:
            decode_started.append(time.monotonic())
            time.sleep(0.3)
            return super().retrieve()

    monkeypatch.setattr("edged.sources.make_capture", lambda config: SlowDecode(config.uri))
    reader = FrameReader(SourceConfig(uri=str(tmp_path / "frame.png"), realtime=False))
    reader.start()
    try:
        frame = reader.get(timeout=5)
        assert frame is not None
        assert frame.mono_time <= decode_started[0]
        assert time.monotonic() - frame.mono_time >= 0.3
        assert abs((time.time() - frame.wall_time) - (time.monotonic() - frame.mono_time)) < 0.05
    finally:
        reader.stop()


def test_mjpeg_server_dies_mid_stream_and_returns(
        make_mjpeg_server: Callable[..., MjpegServer]) -> None:
    """The server goes away under a running stream and comes back on the same port: the
    reader says "reconnecting", then frames flow again within seconds of its return."""
    server = make_mjpeg_server([jpeg(skimage.data.coffee()), jpeg(skimage.data.chelsea())])
    reader, log = started(SourceConfig(uri=server.url, **FAST_NET))
    assert reader.get(5.0) is not None
    server.stop()
    assert log.wait_for("reconnecting", 5.0)
    time.sleep(2.0)
    before = reader.frames
    server.start()
    back = time.monotonic()
    assert log.wait_for("streaming", 8.0, after=log.names().index("reconnecting"))
    frame = reader.get(5.0)
    while frame is not None and frame.index < before:
        frame = reader.get(5.0)
    reader.stop()
    assert frame is not None and time.monotonic() - back < 8.0
