"""The running daemon: models, sinks, one pipeline per stream, signals, systemd, stats.

``Server(config)`` does what a ``Config`` says: ``start()`` loads each model once (streams that
name the same file share one session), opens the sinks and starts the pipelines; ``run()`` adds
signal handling (TERM/INT: stop, HUP: reload), the systemd watchdog and periodic stats, and
returns the exit status; ``stop()`` stops readers, publishes offline status and flushes sinks.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged import __version__, catalog
from edged.config import Config, StreamConfig, load_config
from edged.errors import EdgedError
from edged.frame import Frame
from edged.model import Model, load_model
from edged.pipeline import Pipeline, command_all
from edged.sinks import Sink, open_sinks
from edged.sources import FrameReader
from edged.stats import ProcessStats
from edged.systemd import Notifier, under_systemd

log = logging.getLogger(__name__)

TICK = 0.25  # seconds between checks of signals, watchdog and stats in the main loop


def setup_logging(level: str = "info") -> None:
    """Log lines on stderr; under systemd without timestamps (the journal adds its own)."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not under_systemd():
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)


def model_path(stream: StreamConfig, model_dir: str | None) -> Path:
    """The ONNX file a stream runs: its ``model`` (file or catalog name) or the task's default
    catalog model from the model cache."""
    name = stream.model or catalog.DEFAULT_MODELS[stream.task]
    try:
        return catalog.resolve_model(name, model_dir).resolve()
    except EdgedError as exc:
        hint = "" if stream.model else f" (the default model for task {stream.task!r})"
        raise EdgedError(f"{exc}{hint}") from None


def load_models(config: Config, loaded: dict[Path, Model] | None = None) -> dict[Path, Model]:
    """One model (one ONNX Runtime session) per distinct file; ``loaded`` ones are reused.

    Streams sharing a file share its session; it gets the most threads any of them asks for.
    Raises one ``EdgedError`` naming each stream whose model cannot be used.
    """
    loaded = loaded or {}
    wanted: dict[Path, list[tuple[int, StreamConfig]]] = {}
    problems: list[str] = []
    for i, stream in enumerate(config.streams):
        try:
            wanted.setdefault(model_path(stream, config.model_dir), []).append((i, stream))
        except EdgedError as exc:
            problems.append(f"streams[{i}].model: {exc}")
    models: dict[Path, Model] = {}
    for path, users in wanted.items():
        if path in loaded:
            models[path] = loaded[path]
        else:
            threads = [s.threads for _, s in users if s.threads]
            # memory plan: a shared session runs lean if any of its streams asks for it
            modes = {s.memory or config.memory for _, s in users}
            memory = next(m for m in ("lean", "auto", "default") if m in modes)
            try:
                models[path] = load_model(path, threads=max(threads) if threads else None,
                                          memory=memory)
            except EdgedError as exc:
                problems.extend(f"streams[{i}].model: {exc}" for i, _ in users)
                continue
            log.info("model %s loaded from %s", models[path].info.name, path)
        for i, stream in users:
            task = models[path].info.task
            if task != stream.task:
                problems.append(f"streams[{i}].model: {path.name} is a {task} model but the "
                                f"stream's task is {stream.task}")
    if problems:
        raise EdgedError("\n".join(problems))
    return models


@dataclass
class _Running:
    """A stream as it runs: its configuration, the model file and the pipeline."""

    config: StreamConfig
    model: Path
    pipeline: Pipeline


class Server:
    """The daemon for one ``Config``. ``config_path`` (if any) is re-read on SIGHUP."""

    def __init__(self, config: Config, config_path: str | os.PathLike[str] | None = None,
                 notifier: Notifier | None = None):
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.notifier = notifier or Notifier()
        self.models: dict[Path, Model] = {}
        self.sinks: list[Sink] = []
        self.streams: dict[str, _Running] = {}
        self.process = ProcessStats()
        self.started = time.monotonic()
        self._exit = threading.Event()
        self._status = 0  # exit status of run(): 1 when a source's reader failed
        self._reload = threading.Event()
        self._stalled: set[str] = set()

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Load models, open sinks, start every stream; tell systemd READY=1 once the sources
        have opened (or keep reconnecting on their own)."""
        self.notifier.notify(STATUS="loading models")
        self.models = load_models(self.config)
        self.sinks = open_sinks(self.config, on_command=self.handle_command)
        for i, stream in enumerate(self.config.streams):
            self._start_stream(i, stream)
        self.notifier.notify(STATUS="opening sources")
        for running in self.streams.values():
            running.pipeline.wait_opened(running.config.source.open_timeout + 1.0)
        self.notifier.notify(READY=1, STATUS=self._status_line())
        log.info("edged %s running: device %s, %d stream(s)", __version__, self.config.device,
                 len(self.streams))

    def _start_stream(self, index: int, stream: StreamConfig) -> None:
        path = model_path(stream, self.config.model_dir)
        pipeline = Pipeline(stream, self.models[path], self.sinks, self.config.device,
                            where=f"streams[{index}]")
        pipeline.start()
        self.streams[stream.name] = _Running(stream, path, pipeline)

    def run(self) -> int:
        """Start, serve until a signal (or until every finite source has ended), stop.
        Returns the exit status: 0 on a requested stop or when every finite source ended, 1 when
        a source's reader failed."""
        self._install_signals()
        try:
            self.start()
            self.serve()
        finally:
            self.stop()
        return self._status

    def serve(self) -> None:
        """The main loop: reloads, watchdog pings, stats; returns when asked to exit or when
        every stream has finished."""
        watchdog = self.notifier.watchdog_interval
        next_ping = 0.0
        next_stats = time.monotonic() + self.config.stats_interval
        while not self._exit.wait(TICK):
            now = time.monotonic()
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if self.streams and all(r.pipeline.finished for r in self.streams.values()):
                failed = [n for n, r in self.streams.items() if r.pipeline.source_state == "failed"]
                if failed:  # a broken reader is a failure systemd should restart us for
                    log.error("stopping: the reader of %s failed", ", ".join(failed))
                    self._status = 1
                else:
                    log.info("every source has ended")
                break
            healthy = self._check_progress(now)
            if watchdog and healthy and now >= next_ping:
                self.notifier.notify(WATCHDOG=1)
                next_ping = now + watchdog / 3  # well inside the timeout despite a busy CPU
            if now >= next_stats:
                next_stats = now + self.config.stats_interval
                self.publish_stats()

    def stop(self) -> None:
        """Stop every stream (readers first), publish their offline status, close the sinks
        (the MQTT sink flushes its queue and publishes availability "offline")."""
        if not self.sinks and not self.streams:
            return  # start() failed before anything ran
        self.notifier.notify(STOPPING=1, STATUS="stopping")
        for running in self.streams.values():
            running.pipeline.stop()
        for running in self.streams.values():
            running.pipeline.publish_status("offline")
        for sink in self.sinks:
            try:
                sink.close()
            except EdgedError as exc:
                log.warning("closing a sink: %s", exc)
        self.sinks = []
        log.info("stopped")

    def request_exit(self) -> None:
        """Ask ``serve()`` to return (thread-safe; what SIGTERM does)."""
        self._exit.set()

    def request_reload(self) -> None:
        """Ask ``serve()`` to reload the configuration file (what SIGHUP does)."""
        self._reload.set()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread (e.g. tests, embedding)
        signal.signal(signal.SIGTERM, lambda *_: self.request_exit())
        signal.signal(signal.SIGINT, lambda *_: self.request_exit())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    # -- health, stats ----------------------------------------------------------------------

    def _check_progress(self, now: float) -> bool:
        """True when every pipeline makes progress; logs each change of a stream's health."""
        stalled = {name for name, r in self.streams.items() if r.pipeline.stalled(now)}
        for name in stalled - self._stalled:
            log.error("stream %s: stalled (no progress for %.0f s): watchdog pings stop",
                      name, self.streams[name].pipeline.stall_timeout)
            self.notifier.notify(STATUS=f"stream {name} stalled")
        for name in self._stalled - stalled:
            log.info("stream %s: making progress again", name)
        if self._stalled and not stalled:
            self.notifier.notify(STATUS=self._status_line())
        self._stalled = stalled
        return not stalled

    def _status_line(self) -> str:
        states = ", ".join(f"{n} {r.pipeline.source_state}" for n, r in self.streams.items())
        return f"{len(self.streams)} stream(s): {states}"

    def stats(self) -> dict[str, Any]:
        """The stats message: process, each stream, each sink."""
        return {
            "device": self.config.device,
            "time": round(time.time(), 3),
            "uptime": round(time.monotonic() - self.started, 1),
            "version": __version__,
            "process": {**self.process.sample(), "cores": self.process.cores},
            "streams": {name: r.pipeline.stats() for name, r in self.streams.items()},
            "sinks": [sink.stats() for sink in self.sinks],
        }

    def publish_stats(self) -> None:
        """Publish ``stats`` on every sink and a short STATUS line to systemd."""
        stats = self.stats()
        for sink in self.sinks:
            sink.publish("stats", stats)
        fps = ", ".join(f"{n} {s['fps']:.1f} fps" for n, s in stats["streams"].items())
        self.notifier.notify(STATUS=f"{fps}; cpu {stats['process']['cpu_percent']} %")

    # -- commands ---------------------------------------------------------------------------

    def handle_command(self, stream: str | None, payload: bytes) -> dict[str, Any]:
        """A command from ``<stream>/set`` (or ``set`` for all streams): parse, apply, reply.
        Never raises: every problem becomes ``{"ok": false, "error": ...}``."""
        try:
            message = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            return {"ok": False, "error": f"not JSON: {exc}"}
        if stream is None:
            # A copy: a reload on the main thread may change the streams meanwhile.
            return command_all({name: r.pipeline for name, r in list(self.streams.items())},
                               message)
        running = self.streams.get(stream)
        if running is None:
            return {"ok": False, "error": f"no stream {stream!r} (streams: "
                                          f"{', '.join(self.streams)})"}
        return running.pipeline.command(message)

    # -- reload -----------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the configuration file: apply live settings, restart streams whose source
        or model changed, add and remove streams. A bad new configuration is reported and the
        running one kept. Returns True when the new configuration was applied."""
        if self.config_path is None:
            log.warning("reload: no configuration file to re-read (started from the "
                        "command line)")
            return False
        self.notifier.notify(RELOADING=1, STATUS="reloading")
        try:
            new = load_config(self.config_path)
            models = load_models(new, self.models)
        except EdgedError as exc:
            for line in str(exc).splitlines():
                log.error("reload failed, keeping the running configuration: %s", line)
            self.notifier.notify(READY=1, STATUS="reload failed: configuration kept")
            return False
        for key in ("device", "mqtt", "stdout", "state_dir"):
            if getattr(new, key) != getattr(self.config, key):
                log.warning("reload: %s changed: takes effect on restart", key)
        self.models = models
        wanted = {s.name: (i, s) for i, s in enumerate(new.streams)}
        for name in [n for n in self.streams if n not in wanted]:
            log.info("reload: stream %s removed", name)
            self._stop_stream(name)
        for name, (i, stream) in wanted.items():
            running = self.streams.get(name)
            if running is not None and not _needs_restart(running, stream, new):
                try:
                    running.pipeline.reconfigure(stream)
                    running.config = stream
                    log.info("reload: stream %s settings applied", name)
                except EdgedError as exc:
                    log.error("reload: stream %s keeps its settings: %s", name, exc)
                continue
            if running is not None:
                log.info("reload: stream %s restarts (source or model changed)", name)
                self._stop_stream(name)
            try:
                self._start_stream(i, stream)
            except EdgedError as exc:
                log.error("reload: stream %s cannot start: %s", name, exc)
        self.config.streams = [r.config for r in self.streams.values()]
        self.config.stats_interval = new.stats_interval
        self.notifier.notify(READY=1, STATUS=self._status_line())
        return True

    def _stop_stream(self, name: str) -> None:
        running = self.streams.pop(name)
        running.pipeline.stop()
        running.pipeline.publish_status("removed")


def _needs_restart(running: _Running, stream: StreamConfig, config: Config) -> bool:
    """Whether a stream's change goes beyond the live settings (thresholds, fps, publish)."""
    old = running.config
    return (
        model_path(stream, config.model_dir) != running.model
        or (old.source, old.task, old.region, old.labels, old.top_k, old.threads)
        != (stream.source, stream.task, stream.region, stream.labels, stream.top_k,
            stream.threads)
    )


# ---------------------------------------------------------------------------------------------
# edged check


WARMUP_RUNS = 5


def check(config: Config, out: Any = sys.stdout) -> int:
    """Validate a deployment for real: open each source, load each model, time a warm-up
    inference on a real frame and print a capacity estimate. Returns 0, or 1 on any problem."""
    problems: list[str] = []
    try:
        models = load_models(config)
    except EdgedError as exc:
        problems.extend(str(exc).splitlines())
        models = {}
    rows = []
    for i, stream in enumerate(config.streams):
        where = f"streams[{i}]"
        frame, fps = _first_frame(stream, where, problems)
        try:
            model = models.get(model_path(stream, config.model_dir))
        except EdgedError:
            model = None  # already reported by load_models
        if frame is None or model is None:
            continue
        try:
            pipeline = Pipeline(stream, model, [], config.device, where=where)
        except EdgedError as exc:
            problems.append(str(exc))
            continue
        pipeline.process(frame)  # warm-up: first-run allocations are not the steady state
        start = time.monotonic()
        for _ in range(WARMUP_RUNS):
            pipeline.process(frame)
        ms = (time.monotonic() - start) * 1000 / WARMUP_RUNS
        rate = min(x for x in (stream.fps, fps or 25.0) if x)
        rows.append((stream.name, model.info.name, ms, rate))
        height, width = frame.image.shape[:2]
        print(f"ok   {stream.name}: {model.info.task} with {model.info.name}, {width}x{height} "
              f"frames, {ms:.1f} ms per frame", file=out)
    cores = len(os.sched_getaffinity(0))
    load = sum(ms * rate for _, _, ms, rate in rows) / 1000
    if rows:  # no stream got as far as a timed inference: no estimate to give
        print(f"capacity: {' + '.join(f'{ms:.1f} ms x {rate:g} fps' for _, _, ms, rate in rows)}"
              f" = {load * 100:.0f} % of the machine ({cores} cores, inference uses all of "
              "them)", file=out)
    if load > 1:
        problems.append(f"over capacity: the streams need {load * 100:.0f} % of the machine; "
                        "lower their fps or use a smaller model")
    for problem in problems:
        print(f"FAIL {problem}", file=out)
    print("check passed" if not problems else f"check failed: {len(problems)} problem(s)",
          file=out)
    return 1 if problems else 0


def _first_frame(stream: StreamConfig, where: str,
                 problems: list[str]) -> tuple[Frame | None, float | None]:
    """Open the stream's source and take one frame; (frame, source fps) or (None, None)."""
    reader = FrameReader(stream.source)
    try:
        reader.start()
    except EdgedError as exc:
        problems.append(f"{where}.source.uri: {exc}")
        return None, None
    try:
        frame = reader.get(timeout=stream.source.open_timeout + 2.0)
        fps = reader.fps or None
    finally:
        reader.stop()
    if frame is None:
        problems.append(f"{where}.source.uri: no frame within "
                        f"{stream.source.open_timeout + 2.0:g} s ({reader.detail or reader.state})")
    return frame, fps
