"""A real RTSP server on 127.0.0.1 for tests, and the pytest fixture that runs it.

Run as a script with the system Python (it needs GStreamer's RTSP server through ``gi``)::

    /usr/bin/python3 tests/helpers/rtsp_server.py --port 0 [--clip bikes.mp4]

It serves H.264 at ``rtsp://127.0.0.1:<port>/stream`` and prints ``port <n>`` once it listens.
Without ``--clip`` it serves an endless live test pattern (a moving ball, 320x240, 25 fps); with
``--clip`` it serves the clip's own H.264 track (no re-encoding) at its frame rate, from the start
for each client; at the clip's end the stream ends (a reader reconnects and it plays again).

The test side runs under the project's Python and imports nothing from GStreamer: ``RtspServer``
(start / stop / restart on the same port, freeze / thaw; ``clip_loops`` serves a clip repeated by
stream copy) and the fixtures ``rtsp_server`` and ``rtsp_clip_server``. A test module loads the
fixtures with ``pytest_plugins = ["helpers.rtsp_server"]``.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"
MOUNT = "/stream"
READY_TIMEOUT = 15.0  # seconds for the server process to start listening


def _pipeline(clip: str | None, fps: int) -> str:
    """The media pipeline of one client: the clip's H.264 track or an encoded test pattern."""
    if clip:
        return (f'( filesrc location="{clip}" ! qtdemux ! h264parse '
                "! rtph264pay name=pay0 pt=96 config-interval=1 )")
    return (f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,"
            f"framerate={fps}/1 ! x264enc tune=zerolatency speed-preset=ultrafast "
            f"key-int-max={fps} ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )")


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM / SIGINT (system Python with gi only)."""
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    parser = argparse.ArgumentParser(description="test RTSP server on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--clip", help="MP4 file with an H.264 track (default: test pattern)")
    parser.add_argument("--fps", type=int, default=25, help="test pattern frame rate")
    args = parser.parse_args(argv)

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(_pipeline(args.clip, args.fps))
    # A live pattern is shared by all clients; a clip plays from its start for each client.
    factory.set_shared(args.clip is None)
    server.get_mount_points().add_factory(MOUNT, factory)
    if server.attach(None) == 0:
        sys.exit(f"rtsp_server: cannot listen on 127.0.0.1:{args.port}")

    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, loop.quit)
    print(f"port {server.get_bound_port()}", flush=True)
    loop.run()


class RtspServer:
    """Runs the server script in a child process; ``stop`` / ``start`` keep the same port,
    so a restart looks to clients like a camera that went away and came back."""

    def __init__(self, clip: Path | None = None, clip_loops: int = 1) -> None:
        self.port = 0
        self._clip = clip
        self._clip_loops = clip_loops
        self._served_clip: Path | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="edged-rtsp-")
        self._proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        """The stream's address (valid once started)."""
        return f"rtsp://127.0.0.1:{self.port}{MOUNT}"

    def _clip_to_serve(self) -> Path | None:
        """The clip, repeated ``clip_loops`` times by stream copy (made once, in a tmp dir)."""
        if self._clip is None or self._clip_loops == 1:
            return self._clip
        if self._served_clip is None:
            self._served_clip = Path(self._tmp.name) / f"looped-{self._clip.name}"
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-stream_loop",
                            str(self._clip_loops - 1), "-i", str(self._clip), "-an",
                            "-c", "copy", str(self._served_clip)], check=True, timeout=60)
        return self._served_clip

    def start(self) -> None:
        """Start serving (on the port of the previous run, if any) and wait until it listens."""
        assert self._proc is None, "already running"
        cmd = [SYSTEM_PYTHON, os.fspath(Path(__file__)), "--port", str(self.port)]
        clip = self._clip_to_serve()
        if clip is not None:
            cmd += ["--clip", os.fspath(clip)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], READY_TIMEOUT)
        line = self._proc.stdout.readline() if ready else ""
        if not line.startswith("port "):
            self.stop()
            raise RuntimeError(f"RTSP test server did not start: {cmd}")
        self.port = int(line.split()[1])

    def stop(self, kill: bool = False) -> None:
        """Stop serving (``kill``: SIGKILL, as a crash; otherwise SIGTERM)."""
        if self._proc is None:
            return
        if kill:
            self._proc.kill()
        else:
            self._proc.terminate()
            self._proc.send_signal(signal.SIGCONT)  # a frozen server must wake to see SIGTERM
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout:
            self._proc.stdout.close()
        self._proc = None

    def freeze(self) -> None:
        """Suspend the server process: connections stay open but nothing more arrives."""
        assert self._proc is not None, "not running"
        self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Resume a frozen server."""
        assert self._proc is not None, "not running"
        self._proc.send_signal(signal.SIGCONT)

    def restart(self, kill: bool = True) -> None:
        """Stop and start again on the same port."""
        self.stop(kill=kill)
        self.start()

    def close(self) -> None:
        """Stop and remove the temporary files."""
        self.stop()
        self._tmp.cleanup()


try:
    import pytest
except ImportError:  # the script side runs under the system Python, without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def rtsp_server() -> Iterator[RtspServer]:
        """A running RTSP server with the live test pattern; ``.url``, ``.restart()``."""
        server = RtspServer()
        server.start()
        yield server
        server.close()

    @pytest.fixture
    def rtsp_clip_server(bikes_clip: Path) -> Iterator[RtspServer]:
        """A running RTSP server playing bikes.mp4 (640x272, 25 fps, 10 s) for each client."""
        server = RtspServer(clip=bikes_clip)
        server.start()
        yield server
        server.close()


if __name__ == "__main__":
    main()
