"""The daemon's figures in Prometheus' text format, through prometheus_client.

Read at scrape time from what the daemon counts anyway (a custom collector): nothing is added
to the frame path but the inference histogram's one ``bisect`` (``edged.stats.Histogram``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from edged.stats import peak_rss_mb, rss_mb, temperatures

if TYPE_CHECKING:
    from edged.server import Server


class DaemonCollector(Collector):
    """One daemon's streams, sinks and board, as metric families."""

    def __init__(self, daemon: Server) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator:
        streams = list(self.daemon.streams.items())
        counters = {
            "frames": ("Frames read from the source", lambda p: p.reader.frames),
            "frames_dropped": ("Frames the stream never processed", lambda p: p.reader.drops),
            "frames_decoded": ("Frames decoded into images", lambda p: p.reader.decoded),
            "frames_processed": ("Frames run through the model", lambda p: p.processed),
            "results": ("Results published", lambda p: p.published),
            "frame_errors": ("Frames that failed", lambda p: p.errors),
            "source_reconnects": ("Reopens of a lost source", lambda p: p.reader.reconnects),
        }
        for name, (text, read) in counters.items():
            family = CounterMetricFamily(f"edged_{name}", text, labels=["stream"])
            for stream, running in streams:
                family.add_metric([stream], read(running.pipeline))
            yield family
        up = GaugeMetricFamily("edged_stream_streaming", "1 while the source streams",
                               labels=["stream", "state"])
        for stream, running in streams:
            state = str(running.pipeline.source_state)
            up.add_metric([stream, state], 1.0 if state == "streaming" else 0.0)
        yield up
        inference = HistogramMetricFamily("edged_inference_seconds",
                                          "Time of one inference", labels=["stream"])
        for stream, running in streams:
            histogram = running.pipeline.inference_ms
            buckets = [(b if b == "+Inf" else str(float(b) / 1000), n)
                       for b, n in histogram.buckets()]
            inference.add_metric([stream], buckets, histogram.sum / 1000)
        yield inference
        yield from self._sinks()
        temperature = GaugeMetricFamily("edged_temperature_celsius", "Board temperatures",
                                        labels=["zone"])
        for zone, value in temperatures().items():
            temperature.add_metric([zone], value)
        yield temperature
        memory = GaugeMetricFamily("edged_rss_bytes", "Resident memory", labels=["kind"])
        for kind, value in (("current", rss_mb()), ("peak", peak_rss_mb())):
            if value is not None:
                memory.add_metric([kind], value * 1e6)
        yield memory

    def _sinks(self) -> Iterator:
        figures = [s.stats() for s in self.daemon.sinks]
        mqtt = [f for f in figures if "queued" in f]
        for name, text, kind, key in (
                ("outbox_messages", "Results waiting for the broker", GaugeMetricFamily,
                 "queued"),
                ("outbox_dropped", "Results lost for any reason", CounterMetricFamily,
                 "dropped"),
                ("mqtt_sent", "Results the broker acknowledged", CounterMetricFamily, "sent"),
                ("mqtt_reconnects", "Reconnections to the broker", CounterMetricFamily,
                 "reconnects")):
            family = kind(f"edged_{name}", text)
            for f in mqtt:
                family.add_metric([], f.get(key) or 0)
            yield family


def exposition(daemon: Server) -> bytes:
    """The text a scrape gets."""
    registry = CollectorRegistry()
    registry.register(DaemonCollector(daemon))
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu seconds, ...
    return generate_latest(registry)
