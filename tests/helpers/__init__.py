"""Real servers and processes the tests drive (broker, RTSP, MJPEG, the daemon)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from edged.config import StreamConfig, standalone_stream


def wait_notified(cond: threading.Condition, predicate: Callable[[], bool],
                  timeout: float) -> bool:
    """Wait on ``cond`` until ``predicate()`` holds (re-checked on each notify, or every 0.1 s);
    returns whether it did within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with cond:
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            cond.wait(min(remaining, 0.1))
        return True



def stream_settings(task: str = "detect", **settings: object) -> StreamConfig:
    """A stream's settings checked as a deployment file's would be; ``class_map`` and
    ``class_map_size`` go to its ``publish`` section."""
    publish = {key: settings.pop(key) for key in ("class_map", "class_map_size")
               if key in settings}
    return standalone_stream(task, **settings, **({"publish": publish} if publish else {}))


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` every 20 ms until it holds; whether it did within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
