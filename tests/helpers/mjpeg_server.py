"""A real HTTP MJPEG server on 127.0.0.1 for tests (standard library only), and its fixture.

``GET /stream`` answers ``multipart/x-mixed-replace`` with the given JPEG images, one part per
frame at ``fps``, cycling through them until the client goes away or the server stops. Any other
path answers 404. ``stop`` / ``start`` keep the port, so a restart looks like a camera reboot.
The server runs on threads of the test process. A test module loads the fixtures
``mjpeg_server`` and ``make_mjpeg_server`` with ``pytest_plugins = ["helpers.mjpeg_server"]``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BOUNDARY = "edgedframe"
PATH = "/stream"


class MjpegServer:
    """Serves ``frames`` (encoded JPEG bytes) as an MJPEG stream at ``fps`` frames per second."""

    def __init__(self, frames: Sequence[bytes], fps: float = 25.0, port: int = 0) -> None:
        assert frames, "an MJPEG stream needs at least one frame"
        self.frames = list(frames)
        self.fps = fps
        self.port = port  # 0: any free port, chosen at the first start
        self.clients = 0  # streams served so far
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        """The stream's address (valid once started)."""
        return f"http://127.0.0.1:{self.port}{PATH}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
                if self.path != PATH:
                    self.send_error(404)
                    return
                server.clients += 1
                self.send_response(200)
                self.send_header("Content-Type",
                                 f"multipart/x-mixed-replace; boundary={BOUNDARY}")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                server._stream(self.wfile.write)

            def log_message(self, format: str, *args: object) -> None:  # quiet test output
                pass

        return Handler

    def _stream(self, write: Callable[[bytes], object]) -> None:
        """Write parts at the frame rate until the client leaves or the server stops."""
        period = 1.0 / self.fps
        due = time.monotonic()
        index = 0
        while not self._stopping.is_set():
            jpeg = self.frames[index % len(self.frames)]
            part = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                    f"Content-Length: {len(jpeg)}\r\n\r\n").encode() + jpeg + b"\r\n"
            try:
                write(part)
            except OSError:  # the client went away
                return
            index += 1
            due += period
            self._stopping.wait(max(0.0, due - time.monotonic()))

    def start(self) -> None:
        """Listen (on the previous port, if any) and serve in a background thread."""
        assert self._httpd is None, "already running"
        self._stopping.clear()
        ThreadingHTTPServer.allow_reuse_address = True
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and end every open stream (the clients see the connection close)."""
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = None
        self._thread = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None:

    @pytest.fixture
    def mjpeg_server(bikes_clip: Path) -> Iterator[MjpegServer]:
        """A running MJPEG server cycling through the first 25 frames of bikes.mp4 at 25 fps."""
        import cv2

        capture = cv2.VideoCapture(str(bikes_clip))
        frames = []
        while len(frames) < 25:
            ok, image = capture.read()
            assert ok, f"cannot read {bikes_clip}"
            frames.append(cv2.imencode(".jpg", image)[1].tobytes())
        capture.release()
        server = MjpegServer(frames)
        server.start()
        yield server
        server.stop()

    @pytest.fixture
    def make_mjpeg_server() -> Iterator[Callable[..., MjpegServer]]:
        """``make_mjpeg_server(frames, fps=25, start=True) -> MjpegServer``; an unstarted one
        already has its (free) port, so a client can try it before it comes up."""
        servers: list[MjpegServer] = []

        def make(frames: Sequence[bytes], fps: float = 25.0, start: bool = True) -> MjpegServer:
            server = MjpegServer(frames, fps, port=0 if start else free_port())
            servers.append(server)
            if start:
                server.start()
            return server

        yield make
        for server in servers:
            server.stop()
