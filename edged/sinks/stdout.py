"""The stdout sink: one JSON object per line, ``{"topic": ..., "payload": ...}``, flushed at once.

Binary payloads (snapshots) are not written, only counted. A closed pipe (``edged run | head``)
turns the sink off with one warning instead of stopping the daemon.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Any, TextIO

from edged.errors import EdgedError

log = logging.getLogger("edged.stdout")


class StdoutSink:
    """Writes JSON lines to ``stream`` (standard output by default)."""

    def __init__(self, device: str, topic_prefix: str = "edged",
                 stream: TextIO | None = None) -> None:
        self.prefix = f"{topic_prefix}/{device}"
        self._stream = stream if stream is not None else sys.stdout
        self._lock = threading.Lock()  # one line at a time from several pipelines
        self._written = 0
        self._skipped_binary = 0
        self._broken = False

    def publish(self, topic_suffix: str, payload: bytes | dict, retain: bool = False) -> None:
        """Write one line for a dict payload; count and skip a bytes payload."""
        if isinstance(payload, bytes | bytearray):
            self._skipped_binary += 1
            return
        line: dict[str, Any] = {"topic": f"{self.prefix}/{topic_suffix}", "payload": payload}
        if retain:
            line["retain"] = True
        try:
            text = json.dumps(line, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise EdgedError(f"stdout: payload for {topic_suffix} is not JSON: {exc}") from None
        with self._lock:
            if self._broken:
                return
            try:
                self._stream.write(text + "\n")
                self._stream.flush()
            except (BrokenPipeError, ValueError, OSError) as exc:
                self._broken = True
                log.warning("stdout sink: output closed (%s), no more JSON lines", exc)
                return
            self._written += 1

    def close(self) -> None:
        """Flush standard output (it is not closed: it belongs to the process)."""
        with self._lock:
            if not self._broken:
                try:
                    self._stream.flush()
                except (BrokenPipeError, ValueError, OSError):
                    self._broken = True

    def stats(self) -> dict[str, Any]:
        """Lines written and binary payloads skipped."""
        return {"written": self._written, "skipped_binary": self._skipped_binary}
