"""Where frames come from: one small capture backend per kind of source, and ``FrameReader``.

A backend (``Capture``) only knows how to ``open``, ``grab`` (take the next frame),
``retrieve`` (its image) and ``close`` its kind of source:

| kind | URI | backend |
|---|---|---|
| camera | ``/dev/videoN``, ``/dev/v4l/by-id/...`` or ``N`` | ``V4L2Capture`` |
| network | ``rtsp://``, ``rtsps://``, ``http://``, ``https://`` (MJPEG) | ``NetworkCapture`` |
| video file | any other existing file | ``VideoFileCapture`` |
| still image | a file ending in ``.jpg``, ``.png``, ... | ``ImageCapture`` |
| folder | a directory: its images, sorted by name | ``FolderCapture`` |

``FrameReader`` runs one backend on a thread. It keeps only the newest frame (bounded latency;
frames the consumer never gets are counted as drops), decodes a frame into an image only when
the consumer is expected to take it, reopens a live source that fails with capped exponential
backoff, paces or hands over file frames, and reports each state change
("opening", "streaming", "reconnecting", "ended", "failed", "stopped") through ``on_state``;
"failed" means the reader itself broke (a bug), which the daemon reports with a non-zero exit.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import statistics
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from edged.config import SourceConfig
from edged.domain import SourceKind, SourceState, is_image_file, source_kind
from edged.errors import EdgedError
from edged.frame import Frame

log = logging.getLogger(__name__)

BACKOFF_START = 0.5  # seconds before the first reopen; doubles up to SourceConfig.reconnect_max
FPS_WINDOW = 25  # frames over which the current frame rate is measured
PACE_WINDOW = 5  # the consumer's last takes, whose pace says which frames to decode
DECODE_AHEAD = 1.5  # frame periods before the consumer's expected take that frames decode
REPEAT_STRIDE = 8  # pixel step of the sample that detects a frozen (repeating) live source
STOP_JOIN_MARGIN = 2.0  # seconds beyond a blocking open/read that stop() waits for the thread

StateCallback = Callable[[SourceState, str], None]


def redact(uri: str) -> str:
    """``uri`` without its password, for messages and logs."""
    scheme, sep, rest = uri.partition("://")
    userinfo, at, hostpart = rest.partition("@")
    if not sep or not at or "/" in userinfo or ":" not in userinfo:
        return uri
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"


def to_bgr(image: np.ndarray | None) -> np.ndarray | None:
    """``image`` as H x W x 3 uint8 BGR (gray and BGRA converted), or None if it is unusable."""
    if image is None or image.size == 0 or image.dtype != np.uint8:
        return None
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim != 3:
        return None
    if image.shape[2] == 3:
        return image
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return None


class Capture(ABC):
    """One kind of source. ``grab`` takes the next frame (False when the source has nothing more:
    the end of a finite source, or a failure); ``retrieve`` returns its image (possibly unusable:
    the reader checks it). Backends defer what they can to ``retrieve``, which the reader skips
    for frames nobody will take: OpenCV decodes a V4L2 camera's MJPG and converts colours
    there."""

    #: files, images and folders end normally; cameras and streams are expected to run forever
    finite: bool = False
    #: the source's own frame rate, for pacing finite sources in real time (None: unknown)
    fps: float | None = None
    #: frames a file says it holds (None: unknown); fewer read means it is cut short
    expected_frames: int | None = None

    def __init__(self, uri: str) -> None:
        self.uri = uri

    @abstractmethod
    def open(self) -> str:
        """Open the source; return a one-line description of what it delivers.
        Raise EdgedError if it cannot be opened now (the reader retries)."""

    @abstractmethod
    def grab(self) -> bool:
        """Take the next frame; False at the end of the source or on failure."""

    @abstractmethod
    def retrieve(self) -> np.ndarray | None:
        """The image of the frame ``grab`` took last."""

    @abstractmethod
    def close(self) -> None:
        """Release the source; ``open`` may be called again afterwards."""


class _VideoCaptureBase(Capture):
    """The backends that sit on ``cv2.VideoCapture``."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self._cap: cv2.VideoCapture | None = None

    def _open(self, source: int | str, api: int, params: list[int],
              problem: str) -> cv2.VideoCapture:
        """Open ``source`` with ``api``, or raise EdgedError ``<uri>: <problem>``."""
        cap = cv2.VideoCapture(source, api, params)
        if not cap.isOpened():
            cap.release()
            raise EdgedError(f"{redact(self.uri)}: {problem}")
        self._cap = cap
        return cap

    def _describe(self) -> str:
        """Learn the opened source's frame rate (for pacing) and return ``WxH @ fps``."""
        assert self._cap is not None
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        # Containers without a rate report 0, some streams a 90 kHz clock: neither paces.
        self.fps = fps if 0 < fps <= 1000 else None
        width = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        return f"{width}x{height}" + (f" @ {self.fps:g} fps" if self.fps else "")

    def grab(self) -> bool:
        assert self._cap is not None, "grab before open"
        return self._cap.grab()

    def retrieve(self) -> np.ndarray | None:
        assert self._cap is not None, "retrieve before open"
        ok, image = self._cap.retrieve()
        return image if ok else None

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class V4L2Capture(_VideoCaptureBase):
    """A V4L2 camera. The configured pixel format, size and rate are requested; the description
    says what the device actually gave (devices silently pick the nearest mode they have)."""

    def __init__(self, uri: str, config: SourceConfig) -> None:
        super().__init__(uri)
        self._device: int | str = int(uri) if uri.isdigit() else uri
        self._config = config

    def open(self) -> str:
        config = self._config
        cap = self._open(self._device, cv2.CAP_V4L2, [], "cannot open the V4L2 device")
        # The pixel format first: it decides which sizes and rates the device offers.
        requests = [(cv2.CAP_PROP_FOURCC, config.fourcc and cv2.VideoWriter.fourcc(*config.fourcc)),
                    (cv2.CAP_PROP_FRAME_WIDTH, config.width),
                    (cv2.CAP_PROP_FRAME_HEIGHT, config.height),
                    (cv2.CAP_PROP_FPS, config.fps)]
        for prop, value in requests:
            if value:
                cap.set(prop, value)
        code = int(cap.get(cv2.CAP_PROP_FOURCC))
        fourcc = "".join(chr((code >> (8 * i)) & 0xFF) for i in range(4)).strip("\x00 ")
        got = f"{self._describe()} {fourcc}"
        asked = " ".join(filter(None, [
            f"{config.width or '?'}x{config.height or '?'}" if config.width or config.height
            else "", f"@ {config.fps:g} fps" if config.fps else "", config.fourcc or ""]))
        return f"{got} (asked {asked})" if asked else got


class NetworkCapture(_VideoCaptureBase):
    """An RTSP or HTTP(S) MJPEG stream through FFmpeg, with open and read timeouts so a dead
    server costs seconds, not FFmpeg's default 30 s per read."""

    def __init__(self, uri: str, open_timeout: float, read_timeout: float) -> None:
        super().__init__(uri)
        self._params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout * 1000),
                        cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout * 1000)]

    def open(self) -> str:
        self._open(self.uri, cv2.CAP_FFMPEG, self._params,
                   "cannot open the stream (refused, timed out or not a video stream)")
        return self._describe()


class VideoFileCapture(_VideoCaptureBase):
    """A video file, read from its start at each ``open``."""

    finite = True

    def open(self) -> str:
        cap = self._open(self.uri, cv2.CAP_FFMPEG, [], "not a readable video file")
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.expected_frames = frames if frames > 0 else None
        return self._describe() + (f", {frames} frames" if frames > 0 else "")


class FolderCapture(Capture):
    """The images of a folder in name order, listed again at each ``open`` (so a loop sees
    images added meanwhile). An image that does not decode is handed on empty: a bad frame."""

    finite = True

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self._pending: deque[Path] = deque()
        self._grabbed: Path | None = None

    def _paths(self) -> list[Path]:
        folder = Path(self.uri)
        return sorted(path for path in folder.iterdir()
                      if is_image_file(path) and path.is_file())

    def open(self) -> str:
        try:
            self._pending = deque(self._paths())
        except OSError as exc:
            raise EdgedError(f"{self.uri}: cannot list the folder ({exc.strerror})") from None
        if not self._pending:
            raise EdgedError(f"{self.uri}: the folder holds no images")
        return f"{len(self._pending)} images"

    def grab(self) -> bool:
        self._grabbed = self._pending.popleft() if self._pending else None
        return self._grabbed is not None

    def retrieve(self) -> np.ndarray | None:
        path = self._grabbed
        if path is None:
            return None
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            # Counted as a bad frame by the reader; the log names the file to fix or remove.
            log.warning("source %s: %s is not a readable image, skipped", self.uri, path.name)
            return np.empty((0, 0, 3), np.uint8)
        return image

    def close(self) -> None:
        self._pending.clear()
        self._grabbed = None


class ImageCapture(Capture):
    """One still image, decoded at each ``open`` (a loop repeats it)."""

    finite = True

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self._image: np.ndarray | None = None
        self._grabbed: np.ndarray | None = None

    def open(self) -> str:
        image = cv2.imread(self.uri, cv2.IMREAD_COLOR)
        if image is None:
            raise EdgedError(f"{self.uri}: not a readable image")
        self._image = image
        return f"{image.shape[1]}x{image.shape[0]} still image"

    def grab(self) -> bool:
        self._grabbed, self._image = self._image, None
        return self._grabbed is not None

    def retrieve(self) -> np.ndarray | None:
        return self._grabbed

    def close(self) -> None:
        self._image = self._grabbed = None


def make_capture(config: SourceConfig) -> Capture:
    """The backend for ``config.uri``, unopened, after checking everything that waiting cannot
    fix: the URI's form, that files and folders exist, that a file is a video or an image.

    Raises EdgedError naming the URI. The daemon's ``check`` calls this; ``FrameReader.start``
    does too. Cameras and streams are not contacted here: they may come up later.
    """
    uri = config.uri
    try:
        kind = source_kind(uri)
    except EdgedError as exc:
        raise EdgedError(f"{redact(uri)}: {exc}") from None
    if kind is SourceKind.NETWORK:
        return NetworkCapture(uri, config.open_timeout, config.read_timeout)
    if kind is SourceKind.CAMERA:
        return V4L2Capture(uri, config)
    path = Path(uri).expanduser()
    if path.is_dir():
        capture: Capture = FolderCapture(str(path))
    elif not path.exists():
        raise EdgedError(f"{uri}: no such file or folder")
    elif is_image_file(path):
        capture = ImageCapture(str(path))
    else:
        capture = VideoFileCapture(str(path))
    # Local sources answer at once: a file that does not open now never will.
    capture.open()
    capture.close()
    return capture


def _read_failed(capture: Capture, exc: cv2.error) -> tuple[str, str]:
    """How the reader ends on an OpenCV error: a finite source has ended, a live one is lost."""
    return ("end", f"read failed: {exc}") if capture.finite else ("lost", str(exc))


def _short_file(capture: Capture, read: int) -> str | None:
    """A warning's words when a file ended well before the frame count it declares (cut short
    or damaged); None when it ended where it said (containers' counts may be off by a few)."""
    expected = capture.expected_frames
    if expected is None or read >= expected - max(2, expected // 100):
        return None
    detail = f"ended after {read} of {expected} frames (the file is cut short or damaged)"
    log.warning("source %s: %s", capture.uri, detail)
    return detail


def _median_gap(times: Sequence[float]) -> float:
    """The median time between successive ``times``."""
    return statistics.median(b - a for a, b in itertools.pairwise(times))


class FrameReader:
    """Reads one source on a thread and hands the newest frame to one consumer.

    ``on_state(state, detail)`` is called on every state change, from the reader thread (and
    from the caller's for "opening" in ``start`` and "stopped" in ``stop``); keep it quick.

    Live sources (cameras, streams) never wait for the consumer: a frame not taken before the
    next arrives is dropped and counted. Finite sources with ``realtime`` and a known frame rate
    are paced at that rate (and drop the same way); otherwise each frame waits until the
    consumer has taken the previous one, so none is lost. Where frames drop, each is decoded
    into an image only if the consumer waits for one or, at its recent pace, will ask before
    the next frame is due (``_wanted``): a detector at 5 frames/s behind a 30 frames/s camera
    costs about 10 decodes a second, not 30. A live source that fails to open, fails, or stalls is
    reopened forever with backoff doubling from 0.5 s to ``reconnect_max``.
    """

    def __init__(self, config: SourceConfig, on_state: StateCallback | None = None) -> None:
        self.config = config
        self.state = SourceState.STOPPED
        self.detail = ""  # what the current state is about: the stream's format, the error
        self.frames = 0  # frames read and not found bad; the next frame's index
        self.drops = 0  # frames the consumer never got: not decoded, or overwritten untaken
        self.decoded = 0  # frames decoded into images (the rest of frames - drops was taken)
        self.bad_frames = 0  # frames skipped as empty or malformed
        self.reconnects = 0  # reopen attempts after a failure
        self.source_fps: float | None = None  # the rate the source declares, once it is open
        self._on_state = on_state
        self._cond = threading.Condition()
        self._slot: Frame | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._times: deque[float] = deque(maxlen=FPS_WINDOW)  # when frames came
        self._takes: deque[float] = deque(maxlen=PACE_WINDOW)  # when the consumer took them
        self._waiting = False  # the consumer is blocked in get() for lack of a frame

    @property
    def fps(self) -> float:
        """Frames per second read from the source, over the last few frames (0 when not
        streaming or before the second frame; ``source_fps`` is the declared rate)."""
        times = list(self._times)
        if self.state is not SourceState.STREAMING or len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    def stats(self) -> dict[str, float | int | str]:
        """The counters, for status messages."""
        return {"state": self.state, "frames": self.frames, "drops": self.drops,
                "decoded": self.decoded, "bad_frames": self.bad_frames,
                "reconnects": self.reconnects, "fps": round(self.fps, 2)}

    def start(self) -> None:
        """Check the source (EdgedError if it can never work) and start reading."""
        assert self._thread is None, "a FrameReader starts once"
        capture = make_capture(self.config)
        self._set_state(SourceState.OPENING, redact(capture.uri))
        self._thread = threading.Thread(target=self._run, args=(capture,),
                                        name=f"reader {redact(capture.uri)}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reading and release the source (waits for a blocking open/read to return)."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(max(self.config.open_timeout, self.config.read_timeout)
                              + STOP_JOIN_MARGIN)
        self._set_state(SourceState.STOPPED)

    def get(self, timeout: float) -> Frame | None:
        """The newest frame not yet returned, waiting up to ``timeout`` seconds for one;
        None on timeout, or at once after the last frame of an ended or stopped source."""
        deadline = time.monotonic() + timeout
        with self._cond:
            try:
                while self._slot is None:
                    remaining = deadline - time.monotonic()
                    if self.state.final or remaining <= 0:
                        return None
                    self._waiting = True
                    self._cond.wait(remaining)
            finally:
                self._waiting = False
            frame, self._slot = self._slot, None
            self._takes.append(time.monotonic())
            self._cond.notify_all()
            return frame

    # -- the reader thread --------------------------------------------------------------------

    def _set_state(self, state: SourceState, detail: str = "") -> None:
        """Record a state change and report it; a stopped reader stays stopped."""
        with self._cond:
            if state is self.state or (self.state is SourceState.STOPPED
                                       and state is not SourceState.OPENING):
                return
            self.state, self.detail = state, detail
            self._cond.notify_all()
        log.info("source %s: %s%s", redact(self.config.uri), state, f" ({detail})" * bool(detail))
        if self._on_state is not None:
            try:
                self._on_state(state, detail)
            except Exception:  # a broken listener must not stop the frames
                log.exception("on_state callback failed")

    def _run(self, capture: Capture) -> None:
        backoff = BACKOFF_START
        try:
            while not self._stopping.is_set():
                try:
                    description = capture.open()
                except EdgedError as exc:
                    outcome, detail = "lost", str(exc)
                else:
                    self.source_fps = capture.fps
                    self._set_state(SourceState.STREAMING, description)
                    before, bad_before = self.frames, self.bad_frames
                    outcome, detail = self._pump(capture)
                    capture.close()
                    if self.frames > before:
                        backoff = BACKOFF_START
                    if outcome == "end":
                        read = self.frames - before + self.bad_frames - bad_before
                        detail = _short_file(capture, read) or detail
                        if not self.config.loop or self.frames == before:
                            self._set_state(SourceState.ENDED, detail)
                            return
                        continue
                if outcome == "stop":
                    return
                self._set_state(SourceState.RECONNECTING, detail)
                if self._stopping.wait(backoff):
                    return
                backoff = min(backoff * 2, self.config.reconnect_max)
                self.reconnects += 1
        except Exception as exc:  # never die silently: the daemon sees the state
            log.exception("source %s: reader failed", redact(self.config.uri))
            self._set_state(SourceState.FAILED, f"reader failed: {exc}")
        finally:
            capture.close()

    def _pump(self, capture: Capture) -> tuple[str, str]:
        """Read an opened source until it ends ("end"), fails ("lost") or we stop ("stop")."""
        read_timeout = self.config.read_timeout
        pace_fps = capture.fps if capture.finite and self.config.realtime else None
        period = 1.0 / pace_fps if pace_fps else 0.0
        paced = period > 0
        wait = capture.finite and not paced
        due = time.monotonic() - period  # the first frame goes at once
        last_new = time.monotonic()  # when the last decoded frame differed from the one before
        previous: np.ndarray | None = None  # a sparse sample of the last frame
        bad_since: float | None = None  # when the current run of unusable frames began
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                grabbed = capture.grab()
            except cv2.error as exc:
                return _read_failed(capture, exc)
            # The frame's time is its grab: decoding is part of the latency results report.
            now, wall = time.monotonic(), time.time()
            if not grabbed:
                return ("end", "end of source") if capture.finite else ("lost", "stream ended")
            # After a stalled read FFmpeg hands out old decoder frames: the stream is dead.
            if not capture.finite and now - started >= read_timeout:
                return "lost", f"no frame for {read_timeout:g} s"
            if paced:
                due = max(due + period, now - period)  # late frames do not cause a burst
                if self._stopping.wait(max(0.0, due - now)):
                    break
                now, wall = time.monotonic(), time.time()
            self._times.append(now)
            # After an unusable frame every frame is decoded until one is usable again.
            if not wait and bad_since is None and not self._wanted(now):
                with self._cond:
                    self.frames += 1
                    self.drops += 1
                continue
            try:
                image = to_bgr(capture.retrieve())
            except cv2.error as exc:
                return _read_failed(capture, exc)
            if image is None:
                self.bad_frames += 1
                bad_since = bad_since or now
                if not capture.finite and now - bad_since > read_timeout:
                    return "lost", f"no usable frame for {read_timeout:g} s"
                continue
            bad_since = None
            if not capture.finite:
                # A frozen source repeats its last frame; a live scene never does for long.
                # Sensor noise touches every pixel, so a sparse sample tells them apart cheaply.
                sample = image[::REPEAT_STRIDE, ::REPEAT_STRIDE].copy()
                if previous is None or not np.array_equal(sample, previous):
                    last_new = now
                elif now - last_new > read_timeout:
                    return "lost", f"the same frame for {read_timeout:g} s"
                previous = sample
            self._put(Frame(image=image, index=0, wall_time=wall, mono_time=now), wait)
        return "stop", ""

    def _wanted(self, now: float) -> bool:
        """Whether the frame that came at ``now`` is worth decoding: the consumer waits for one,
        or at its recent pace takes the next within ``DECODE_AHEAD`` frame periods. Unsure (too
        few frames or takes seen yet) means yes."""
        with self._cond:
            if self._waiting or len(self._takes) < PACE_WINDOW or len(self._times) < 3:
                return True
            takes, times = list(self._takes), list(self._times)
        return now + DECODE_AHEAD * _median_gap(times) >= takes[-1] + _median_gap(takes)

    def _put(self, frame: Frame, wait: bool) -> None:
        """Hand a frame to the consumer (waiting for the slot if ``wait``), dropping the
        untaken one otherwise; the frame gets its index here."""
        with self._cond:
            while wait and self._slot is not None and not self._stopping.is_set():
                self._cond.wait()
            if self._stopping.is_set():
                return
            if self._slot is not None:
                self.drops += 1
            self._slot = dataclasses.replace(frame, index=self.frames)
            self.frames += 1
            self.decoded += 1
            self._cond.notify_all()
