"""The web view, health check and metrics (``http:`` in the configuration, off by default).

| path | what |
|---|---|
| ``/`` | one static page: every stream's live preview and figures, the device's (docs/web.md) |
| ``/api/status`` | what the page shows, as JSON |
| ``/streams/<name>/mjpeg`` | the live preview: annotated frames, at most ``preview_fps`` a second |
| ``/streams/<name>/snapshot.jpg`` | the latest annotated frame |
| ``/healthz`` | 200 when every stream streams and no outbox is full, else 503 with the reasons |
| ``/metrics`` | Prometheus text format, through prometheus_client |

Bound to 127.0.0.1 unless an address is given; with a token (any address other than loopback
needs one) every request must carry it, as a bearer token or as basic auth's password, or gets
401 and nothing else. Frames are drawn and encoded only while someone watches, on the viewer's
thread: the pipelines never wait for a viewer.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any

from edged.config import HttpConfig
from edged.domain import SourceState
from edged.errors import EdgedError

if TYPE_CHECKING:
    from edged.server import Server

log = logging.getLogger(__name__)

BOUNDARY = "edgedframe"


class WebServer:
    """Serves one daemon's web view on a thread; ``start()``, ``stop()``."""

    def __init__(self, daemon: Server, config: HttpConfig) -> None:
        self.daemon = daemon
        self.config = config
        self.stopping = threading.Event()
        self.page = resources.files("edged").joinpath("static/index.html").read_bytes()
        handler = type("Handler", (_Handler,), {"web": self})
        try:
            self.httpd = ThreadingHTTPServer((config.address, config.port), handler)
        except OSError as exc:
            raise EdgedError(f"http: cannot listen on {config.address}:{config.port}: "
                             f"{exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="edged-http",
                                        daemon=True)

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()
        log.info("http: serving on %s:%d", self.config.address, self.port)

    def stop(self) -> None:
        """End every preview and stop serving."""
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    # -- what the endpoints return ----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The page's figures: the stats message plus each stream's task, model, state and
        last result."""
        stats = self.daemon.stats()
        for name, running in list(self.daemon.streams.items()):
            pipeline = running.pipeline
            stats["streams"].setdefault(name, {}).update(
                task=pipeline.model.info.task, model=pipeline.model.info.name,
                detail=pipeline.source_detail, last_result=pipeline.last_result)
        return stats

    def health(self) -> tuple[bool, list[str]]:
        """Whether every stream streams and no outbox is full; the reasons when not."""
        reasons = [f"stream {name}: {r.pipeline.source_state}"
                   + (f" ({r.pipeline.source_detail})" if r.pipeline.source_detail else "")
                   for name, r in list(self.daemon.streams.items())
                   if r.pipeline.source_state is not SourceState.STREAMING]
        mqtt = self.daemon.config.mqtt
        for sink in self.daemon.sinks:
            figures = sink.stats()
            if mqtt is not None and "queued" in figures and (
                    figures["queued"] >= mqtt.outbox_max
                    or figures.get("queued_bytes", 0) >= mqtt.outbox_max_mb << 20):
                reasons.append(f"outbox full ({figures['queued']} results waiting)")
        if not self.daemon.streams:
            reasons.append("no stream runs")
        return not reasons, reasons

    def metrics(self) -> bytes:
        """The Prometheus exposition of the daemon's figures."""
        from edged.metrics import exposition

        return exposition(self.daemon)

    def authorized(self, header: str | None) -> bool:
        """Whether the Authorization header carries the token (always, without one)."""
        token = self.config.token
        if token is None:
            return True
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip()).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
        else:
            return False
        return hmac.compare_digest(given.encode(), token.encode())


class _Handler(BaseHTTPRequestHandler):
    web: WebServer
    server_version = "edged"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: %s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        if not self.web.authorized(self.headers.get("Authorization")):
            self.send_response(HTTPStatus.UNAUTHORIZED)
            self.send_header("WWW-Authenticate", 'Basic realm="edged", charset="UTF-8"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = self.path.split("?", 1)[0]
        parts = path.strip("/").split("/")
        if path == "/":
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", self.web.page)
        elif path == "/api/status":
            self._json(HTTPStatus.OK, self.web.status())
        elif path == "/healthz":
            healthy, reasons = self.web.health()
            self._json(HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE,
                       {"healthy": healthy, "reasons": reasons})
        elif path == "/metrics":
            self._send(HTTPStatus.OK, "text/plain; version=0.0.4; charset=utf-8",
                       self.web.metrics())
        elif len(parts) == 3 and parts[0] == "streams" and parts[2] in ("mjpeg", "snapshot.jpg"):
            running = self.web.daemon.streams.get(parts[1])
            if running is None:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no stream {parts[1]!r}"})
            elif parts[2] == "mjpeg":
                self._mjpeg(running.pipeline.preview)
            else:
                latest = running.pipeline.preview.jpeg()
                if latest is None:
                    self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no frame yet"})
                else:
                    self._send(HTTPStatus.OK, "image/jpeg", latest[1])
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def _send(self, status: HTTPStatus, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, data: Any) -> None:
        self._send(status, "application/json", json.dumps(data, default=str).encode())

    def _mjpeg(self, preview: Any) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        period = 1.0 / self.web.config.preview_fps
        seq, due = 0, 0.0
        with preview:
            while not self.web.stopping.is_set():
                if self.web.stopping.wait(max(0.0, due - time.monotonic())):
                    break
                found = preview.next_jpeg(seq, timeout=1.0)
                if found is None:
                    continue
                seq, jpeg = found
                due = time.monotonic() + period
                try:
                    self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                                     f"Content-Length: {len(jpeg)}\r\n\r\n".encode()
                                     + jpeg + b"\r\n")
                    self.wfile.flush()
                except OSError:  # the viewer left
                    return
