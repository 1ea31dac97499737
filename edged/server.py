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

import cv2
import msgspec

from edged import __version__, annotate, catalog
from edged.config import Config, MemoryMode, StreamConfig, load_config
from edged.domain import SourceKind, SourceState, usable_cores
from edged.errors import EdgedError
from edged.frame import Frame
from edged.model import Model, load_model
from edged.pipeline import Pipeline, command_all
from edged.sinks import Sink, open_sinks
from edged.sources import FrameReader
from edged.stats import ProcessStats
from edged.systemd import Notifier, journal_formatter, under_systemd
from edged.validation import reload_of

log = logging.getLogger(__name__)

TICK = 0.25  # seconds between checks of signals, watchdog and stats in the main loop


def setup_logging(level: str = "info") -> None:
    """Log lines on stderr; under systemd without timestamps (the journal adds its own), and
    with the journal's priority prefix (``<3>``) when stderr is the journal."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not under_systemd():
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(journal_formatter(fmt) or logging.Formatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def model_path(stream: StreamConfig, model_dir: str | None) -> Path:
    """The ONNX file a stream runs: its ``model`` (file or catalog name) or the task's default
    catalog model from the model cache."""
    name = stream.model or catalog.DEFAULT_MODELS[stream.task]
    try:
        return catalog.resolve_model(name, model_dir).resolve()
    except EdgedError as exc:
        hint = "" if stream.model else f" (the default model for task {stream.task!r})"
        raise EdgedError(f"{exc}{hint}") from None


@dataclass(frozen=True)
class SessionSpec:
    """One ONNX Runtime session: a model file with its thread count and memory mode. Streams
    whose settings give the same spec share the session; a stream whose spec changes on reload
    restarts on a new one."""

    path: Path
    threads: int | None
    memory: MemoryMode


def session_specs(config: Config) -> dict[str, SessionSpec]:
    """Each stream's session. Streams naming the same file share one, with the most threads any
    of them asks for, run lean if any of them asks for it. Raises one ``EdgedError`` naming
    each stream whose model cannot be found."""
    paths: dict[str, Path] = {}
    problems: list[str] = []
    for i, stream in enumerate(config.streams):
        try:
            paths[stream.name] = model_path(stream, config.model_dir)
        except EdgedError as exc:
            problems.append(f"streams[{i}].model: {exc}")
    if problems:
        raise EdgedError("\n".join(problems))
    specs: dict[str, SessionSpec] = {}
    for path in set(paths.values()):
        users = [s for s in config.streams if paths[s.name] == path]
        threads = [s.threads for s in users if s.threads]
        modes = {s.memory or config.memory for s in users}
        memory = next(m for m in ("lean", "auto", "default") if m in modes)
        spec = SessionSpec(path, max(threads) if threads else None, memory)
        specs.update((s.name, spec) for s in users)
    return specs


def load_models(config: Config, loaded: dict[SessionSpec, Model] | None = None
                ) -> dict[str, tuple[SessionSpec, Model]]:
    """Each stream's session spec and model; models in ``loaded`` with the same spec are
    reused. Raises one ``EdgedError`` naming each stream whose model cannot be used."""
    loaded = loaded or {}
    specs = session_specs(config)
    models: dict[SessionSpec, Model] = {}
    problems: list[str] = []
    for spec in dict.fromkeys(specs.values()):
        users = [i for i, s in enumerate(config.streams) if specs[s.name] == spec]
        if spec in loaded:
            models[spec] = loaded[spec]
            continue
        try:
            models[spec] = load_model(spec.path, threads=spec.threads, memory=spec.memory)
        except EdgedError as exc:
            problems.extend(f"streams[{i}].model: {exc}" for i in users)
            continue
        log.info("model %s loaded from %s", models[spec].info.name, spec.path)
    for i, stream in enumerate(config.streams):
        model = models.get(specs[stream.name])
        if model is not None and model.info.task != stream.task:
            problems.append(f"streams[{i}].model: {specs[stream.name].path.name} is a "
                            f"{model.info.task} model but the stream's task is {stream.task}")
    if problems:
        raise EdgedError("\n".join(problems))
    return {name: (spec, models[spec]) for name, spec in specs.items()}


@dataclass
class _Running:
    """A stream as it runs: its configuration, its session and the pipeline."""

    config: StreamConfig
    session: SessionSpec
    pipeline: Pipeline


class Server:
    """The daemon for one ``Config``. ``config_path`` (if any) is re-read on SIGHUP."""

    def __init__(self, config: Config, config_path: str | os.PathLike[str] | None = None,
                 notifier: Notifier | None = None):
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.notifier = notifier or Notifier()
        self.models: dict[str, tuple[SessionSpec, Model]] = {}  # per stream
        self.sinks: list[Sink] = []
        self.streams: dict[str, _Running] = {}
        self.process = ProcessStats()
        self.started = time.monotonic()
        self._exit = threading.Event()
        self._status = 0  # exit status of run(): 1 when a stream failed
        self._reload = threading.Event()
        self._stalled: set[str] = set()
        self._announced: dict[str, bytes] = {}  # Home Assistant discovery, by topic
        self.web: Any = None  # the WebServer, when http: is on

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Load models, open sinks, start every stream; tell systemd READY=1 once the sources
        have opened (or keep reconnecting on their own)."""
        self.notifier.notify(STATUS="loading models")
        self.models = load_models(self.config)
        self.sinks = open_sinks(self.config, on_command=self.handle_command)
        self.announce()
        if self.config.http is not None:
            from edged.web import WebServer

            self.web = WebServer(self, self.config.http)
            self.web.start()
        for i, stream in enumerate(self.config.streams):
            self._start_stream(i, stream)
        self.notifier.notify(STATUS="opening sources")
        for running in self.streams.values():
            running.pipeline.wait_opened(running.config.source.open_timeout + 1.0)
        self.notifier.notify(READY=1, STATUS=self._status_line())
        log.info("edged %s running: device %s, %d stream(s)", __version__, self.config.device,
                 len(self.streams))

    def _start_stream(self, index: int, stream: StreamConfig) -> None:
        spec, model = self.models[stream.name]
        pipeline = Pipeline(stream, model, self.sinks, self.config.device,
                            where=f"streams[{index}]", state_dir=self.config.state_dir)
        pipeline.start()
        self.streams[stream.name] = _Running(stream, spec, pipeline)

    def run(self) -> int:
        """Start, serve until a signal (or until every finite source has ended), stop.
        Returns the exit status: 0 on a requested stop or when every finite source ended, 1 when
        a stream failed (its reader or its worker broke), so that systemd restarts edged."""
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
                failed = [n for n, r in self.streams.items()
                          if r.pipeline.source_state is SourceState.FAILED]
                if failed:  # a broken stream is a failure systemd should restart us for
                    log.error("stopping: stream %s failed", ", ".join(failed))
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
        if self.web is not None:
            self.web.stop()
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

    def announce(self) -> None:
        """Publish the Home Assistant discovery of the running configuration (and remove what
        an earlier one announced and this one lacks); again whenever Home Assistant says it is
        back online. Nothing without an MQTT sink."""
        from edged.homeassistant import Discovery, record_path, replace_record
        from edged.sinks.mqtt import MqttSink

        sink = next((s for s in self.sinks if isinstance(s, MqttSink)), None)
        if sink is None:
            return
        if self.config.home_assistant is None:
            messages: dict[str, bytes] = {}
            removed = replace_record(record_path(self.config.state_dir), messages)
        else:
            discovery = Discovery(self.config, self.config.state_dir)
            messages = discovery.messages()
            removed = discovery.removed(messages)

            def on_status(payload: bytes) -> None:
                if payload == b"online":  # Home Assistant restarted: announce again
                    for topic, data in self._announced.items():
                        sink.publish_retained(topic, data)

            sink.watch(discovery.status_topic, on_status)
        self._announced = messages
        for topic in removed:
            sink.publish_retained(topic, b"")
        for topic, data in messages.items():
            sink.publish_retained(topic, data)
        if messages or removed:
            log.info("home assistant: %d entities announced, %d removed", len(messages),
                     len(removed))

    def request_exit(self) -> None:
        """Ask ``serve()`` to return (thread-safe; what SIGTERM does)."""
        self._exit.set()

    def request_reload(self) -> None:
        """Ask ``serve()`` to reload the configuration file (what SIGHUP does)."""
        self._reload.set()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread (e.g. tests, embedding)

        def on_stop(signum: int, frame: Any) -> None:
            if self._exit.is_set():  # asked twice: the user does not want to wait
                os.write(2, b"edged: stop asked again: exiting at once\n")
                os._exit(128 + signum)
            self.request_exit()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    # -- health, stats ----------------------------------------------------------------------

    def _check_progress(self, now: float) -> bool:
        """True when every pipeline makes progress; logs each change of a stream's health."""
        stalled = {name for name, r in self.streams.items() if r.pipeline.stalled(now)}
        for name in stalled - self._stalled:
            log.error("stream %s: stalled (no progress for %.0f s): watchdog pings stop",
                      name, self.streams[name].pipeline.config.stall_timeout)
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
            "process": {**self.process.sample(), "cores": usable_cores()},
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
        """Re-read the configuration file and apply every change: live settings to the running
        streams, a restart with everything rebuilt for a stream whose other settings or session
        changed, new streams started, removed ones stopped. Settings that need edged restarted
        keep their running value, each with an error line. A bad new configuration is reported
        and the running one kept. Returns True when the new configuration was applied."""
        if self.config_path is None:
            log.warning("reload: no configuration file to re-read (started from the "
                        "command line)")
            return False
        self.notifier.notify(RELOADING=1, STATUS="reloading")
        try:
            new = self._keep_daemon_settings(load_config(self.config_path))
            loaded = dict(self.models.values())
            models = load_models(new, loaded)
        except EdgedError as exc:
            for line in str(exc).splitlines():
                log.error("reload failed, keeping the running configuration: %s", line)
            self.notifier.notify(READY=1, STATUS="reload failed: configuration kept")
            return False
        self.models = models
        wanted = {s.name: (i, s) for i, s in enumerate(new.streams)}
        for name in [n for n in self.streams if n not in wanted]:
            log.info("reload: stream %s removed", name)
            self._stop_stream(name)
        for name, (i, stream) in wanted.items():
            running = self.streams.get(name)
            reasons = running and restart_reasons(running, stream, models[name][0])
            if running is not None and not reasons:
                try:
                    running.pipeline.reconfigure(stream)
                    running.config = stream
                    log.info("reload: stream %s settings applied", name)
                except EdgedError as exc:
                    log.error("reload: stream %s keeps its settings: %s", name, exc)
                continue
            if running is not None:
                log.info("reload: stream %s restarts (%s changed)", name, ", ".join(reasons))
                self._stop_stream(name)
            try:
                self._start_stream(i, stream)
            except EdgedError as exc:
                log.error("reload: stream %s cannot start: %s", name, exc)
        self.config = msgspec.structs.replace(
            new, streams=[r.config for r in self.streams.values()])
        logging.getLogger().setLevel(self.config.logging.level.upper())
        self.announce()
        self.notifier.notify(READY=1, STATUS=self._status_line())
        return True

    def _keep_daemon_settings(self, new: Config) -> Config:
        """``new`` with the running value of each setting that takes a restart of edged."""
        kept = {}
        for field in msgspec.structs.fields(Config):
            name = field.name
            if reload_of(Config, name) == "daemon" and getattr(new, name) != getattr(
                    self.config, name):
                log.error("reload: %s changed: it takes effect when edged restarts "
                          "(systemctl restart edged); keeping the running value", name)
                kept[name] = getattr(self.config, name)
        return msgspec.structs.replace(new, **kept)

    def _stop_stream(self, name: str) -> None:
        running = self.streams.pop(name)
        running.pipeline.stop()
        running.pipeline.publish_status("removed")


def restart_reasons(running: _Running, new: StreamConfig, session: SessionSpec) -> list[str]:
    """What makes a stream restart on reload: its settings that are not live, and its session
    (model file, threads, memory mode; also moved by top-level settings and streams that
    share the file)."""
    old = running.config
    reasons = [f.name for f in msgspec.structs.fields(StreamConfig)
               if reload_of(StreamConfig, f.name) != "live"
               and getattr(old, f.name) != getattr(new, f.name)]
    if session != running.session and not reasons:
        reasons.append("session")
    return reasons


# ---------------------------------------------------------------------------------------------
# edged check


WARMUP_RUNS = 5
FILE_FIRST_FRAME = 30.0  # seconds edged check waits for a file's first frame


def check(config: Config, out: Any = sys.stdout, draw: Path | None = None) -> int:
    """Validate a deployment for real: open each source, load each model, time a warm-up
    inference on a real frame and print a capacity estimate. Returns 0, or 1 on any problem.
    ``draw``: write each stream's frame with its zones, lines and masks to this PNG (one file
    per stream, named after it, when there are several)."""
    problems: list[str] = []
    try:
        models = {name: model for name, (_, model) in load_models(config).items()}
    except EdgedError as exc:
        problems.extend(str(exc).splitlines())
        models = {}
    rows = []
    for i, stream in enumerate(config.streams):
        where = f"streams[{i}]"
        frame, fps = _first_frame(stream, where, problems)
        if frame is not None and draw is not None:
            picture = draw if len(config.streams) == 1 else draw.with_name(
                f"{draw.stem}-{stream.name}{draw.suffix}")
            if not cv2.imwrite(str(picture), annotate.draw_scene(frame.image, stream)):
                problems.append(f"--draw: cannot write {picture}")
            else:
                print(f"drew {stream.name}'s zones, lines and masks on {picture}", file=out)
        model = models.get(stream.name)  # None: reported by load_models
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
    cores = usable_cores()
    load = sum(ms * rate for _, _, ms, rate in rows) / 1000
    if rows:  # no stream got as far as a timed inference: no estimate to give
        print(f"capacity: {' + '.join(f'{ms:.1f} ms x {rate:g} fps' for _, _, ms, rate in rows)}"
              f" = {load * 100:.0f} % of the machine ({cores} cores, inference uses all of "
              "them)", file=out)
    # An estimate from a few timed runs follows the machine's load of the moment: it warns,
    # and never turns the verdict, so that the same deployment gets the same answer each time.
    warnings = [f"over capacity: the streams need about {load * 100:.0f} % of the machine; "
                "lower their fps or use a smaller model"] if load > 1 else []
    for warning in warnings:
        print(f"WARN {warning}", file=out)
    for problem in problems:
        print(f"FAIL {problem}", file=out)
    notes = f" ({len(warnings)} warning)" if warnings else ""
    print(f"check passed{notes}" if not problems else
          f"check failed: {len(problems)} problem(s){notes}", file=out)
    return 1 if problems else 0


def _first_frame(stream: StreamConfig, where: str,
                 problems: list[str]) -> tuple[Frame | None, float | None]:
    """Open the stream's source and take one frame; (frame, source fps) or (None, None).

    A file is read unpaced (its first frame waits for us) with a generous timeout: a local
    file has no network to wait for, so only a busy machine could make it late."""
    source = stream.source
    is_file = source.kind is SourceKind.FILE
    if is_file:
        source = msgspec.structs.replace(source, realtime=False)
    reader = FrameReader(source)
    try:
        reader.start()
    except EdgedError as exc:
        problems.append(f"{where}.source.uri: {exc}")
        return None, None
    timeout = FILE_FIRST_FRAME if is_file else source.open_timeout + 2.0
    try:
        frame = reader.get(timeout=timeout)
        fps = reader.source_fps if is_file else reader.fps or None
    finally:
        reader.stop()
    if frame is None:
        problems.append(f"{where}.source.uri: no frame within {timeout:g} s "
                        f"({reader.detail or reader.state})")
    return frame, fps
