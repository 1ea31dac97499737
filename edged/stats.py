"""Measurements the daemon reports: process CPU and memory, board temperature, rolling timings.

Everything here reads /proc and /sys directly (no extra dependencies) and degrades to ``None``
where a file is not readable (containers, non-Linux development machines).
"""

from __future__ import annotations

import bisect
import glob
import os
import resource
import threading
import time
from collections import deque

import numpy as np


class ProcessStats:
    """CPU % (since the previous sample), RSS and peak RSS of this process, and temperatures."""

    def __init__(self) -> None:
        self._last_cpu = time.process_time()
        self._last_wall = time.monotonic()

    def sample(self) -> dict[str, float | None | dict[str, float]]:
        """One reading; ``cpu_percent`` is of one core (200 = two cores busy)."""
        cpu, wall = time.process_time(), time.monotonic()
        elapsed = wall - self._last_wall
        percent = 100.0 * (cpu - self._last_cpu) / elapsed if elapsed > 0 else None
        self._last_cpu, self._last_wall = cpu, wall
        return {
            "cpu_percent": None if percent is None else round(percent, 1),
            "rss_mb": rss_mb(),
            "peak_rss_mb": peak_rss_mb(),
            "temperature_c": temperatures(),
        }


def rss_mb() -> float | None:
    """Resident memory of this process in MB (from /proc/self/statm)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 1e6, 1)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux reports ru_maxrss in KB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6, 1)


def temperatures(root: str = "/sys/class/thermal") -> dict[str, float]:
    """Readable thermal zones as {type: degrees C}, e.g. {"cpu-thermal": 51.6}; empty if none."""
    readings: dict[str, float] = {}
    for zone in sorted(glob.glob(f"{root}/thermal_zone*")):
        try:
            with open(f"{zone}/temp") as f:
                millis = int(f.read().strip())
            with open(f"{zone}/type") as f:
                name = f.read().strip() or os.path.basename(zone)
        except (OSError, ValueError):
            continue
        readings[name] = round(millis / 1000, 1)
    return readings


class Window:
    """The last ``size`` values of a measurement (thread-safe): means and percentiles for stats.

    A bounded window keeps memory flat on a daemon that runs for months.
    """

    def __init__(self, size: int = 256):
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        """Record one value."""
        with self._lock:
            self._values.append(value)

    def summary(self, digits: int = 2) -> dict[str, float] | None:
        """Mean, p50 and p99 of the window, or None when empty."""
        with self._lock:
            if not self._values:
                return None
            values = np.fromiter(self._values, dtype=np.float64)
        p50, p99 = np.percentile(values, [50, 99])
        return {"mean": round(float(values.mean()), digits), "p50": round(float(p50), digits),
                "p99": round(float(p99), digits)}


class RateMeter:
    """Events per second over a sliding time span (e.g. processed frames per second)."""

    def __init__(self, span: float = 5.0):
        self.span = span
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def tick(self, now: float | None = None) -> None:
        """Count one event."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._times.append(now)
            self._trim(now)

    def rate(self, now: float | None = None) -> float:
        """Events per second over the last ``span`` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            if len(self._times) < 2:
                return float(len(self._times)) / self.span
            return (len(self._times) - 1) / max(now - self._times[0], 1e-6)

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.span:
            self._times.popleft()


# Bounds (ms) of the inference-time histogram: a desktop CPU's 5 ms to a Pi's segmentation.
LATENCY_BUCKETS_MS = (5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)


class Histogram:
    """Counts of values at or under fixed bounds since start, their sum and count: what a
    Prometheus histogram exposes (one ``bisect`` per value on the frame path)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_MS) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def add(self, value: float) -> None:
        """Count one value."""
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative ``(upper bound, count)`` pairs, ending with ``("+Inf", count)``."""
        total, out = 0, []
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self._counts, strict=True):
            total += n
            out.append((bound, total))
        return out
