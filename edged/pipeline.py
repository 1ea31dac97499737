"""One stream's worker: reader -> preprocess -> session -> postprocess -> result -> sinks.

Each stream runs in its own thread. It takes the newest frame from its ``FrameReader`` (so a slow
model drops stale frames instead of falling behind), applies the fps limit, runs the shared
model, decides with the publish policy whether the result goes out, and publishes results,
retained status / meta and (detect) annotated snapshots. Commands from ``.../set`` change its
settings live.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import msgspec

from edged import annotate
from edged.config import Command, PublishConfig, StreamConfig
from edged.domain import SourceState
from edged.errors import EdgedError, did_you_mean
from edged.frame import Frame
from edged.model import Model
from edged.postprocess import Classification, Detections, Postprocessor, TaskResult
from edged.preprocess import Preprocessor
from edged.preview import Preview
from edged.results import ResultBuilder, Timings
from edged.scene import DetectionFilter, Scene, SceneUpdate, check_line_names
from edged.sinks import Sink
from edged.sources import FrameReader, redact
from edged.stats import Histogram, RateMeter, Window
from edged.validation import check_value, describe

log = logging.getLogger(__name__)

# Segment results count as changed when any class's fraction moves by more than this.
SEGMENT_CHANGE = 0.01
# Seconds stop() waits for the frame in flight (a segmentation on a slow board takes seconds).
STOP_TIMEOUT = 30.0


class Pipeline:
    """The worker of one stream. ``start()``, ``stop()``, ``command(dict) -> reply``.

    ``config`` holds the stream's live settings: commands and reloads replace it whole (it is
    immutable), and the worker reads it afresh for every frame. ``model`` may be shared with
    other pipelines (ONNX Runtime sessions are thread-safe); everything else (reader,
    preprocess buffer, policy state) belongs to this stream.
    """

    def __init__(
        self,
        config: StreamConfig,
        model: Model,
        sinks: Sequence[Sink],
        device: str,
        where: str = "stream",
        state_dir: str | None = None,
    ):
        self.config = config
        self.model = model
        self.sinks = list(sinks)
        self.device = device
        self.name = config.name
        # Detect streams: masks and area bounds, then (with tracking) tracks, zones and lines.
        self.filter = DetectionFilter(config)
        self.scene: Scene | None = None
        if config.task == "detect" and config.tracking is not None:
            counts = Path(state_dir) / "lines" / f"{config.name}.json" if state_dir else None
            self.scene = Scene(config, model.info.labels, device, counts, where,
                               draw=self._track_snapshot)
        self._frame_size: tuple[int, int] | None = None
        self.preview = Preview()  # for the web view: nothing drawn unless someone watches
        self.last_result: dict[str, Any] | None = None
        self.inference_ms = Histogram()
        self.where = where
        self.paused = False
        self._post = Postprocessor(model.info, config, where)  # checks labels / thresholds
        self.preprocess = Preprocessor(model.info.input, config.region)
        self.results = ResultBuilder(device, config.name, model.info.task, model.info.name)
        self.reader = FrameReader(config.source, on_state=self._on_source_state)
        self.processed = 0
        self.published = 0
        self.skipped = 0  # results the publish policy held back
        self.errors = 0
        self.fps = RateMeter()
        self.timings = {key: Window() for key in ("preprocess", "inference", "postprocess",
                                                  "total", "frame_age")}
        self.source_state = SourceState.OPENING
        self._worker_failed = False
        self.source_detail = ""
        self._progress = time.monotonic()
        self._last_key: Any = None
        self._last_publish = -math.inf
        self._last_snapshot = -math.inf
        self._lock = threading.Lock()  # serializes setting changes (commands vs reload)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stream-{self.name}", daemon=True)

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Publish meta, start the reader and the worker thread."""
        self._publish("meta", self.meta(), retain=True)
        if self.scene is not None:
            now = time.time()
            for name in self.config.zones:
                self._publish(f"zones/{name}", self.scene.zone_state(name, now), retain=True)
            for name in self.config.lines:
                self._publish(f"lines/{name}", self.scene.line_state(name, now), retain=True)
        self.reader.start()
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the reader (its last state, "stopped", is published) and the worker.

        Waits up to ``timeout`` for the frame in flight: leaving the worker inside ONNX Runtime
        while the interpreter exits aborts the process, and its result would follow
        "offline"."""
        self._stop.set()
        self.reader.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("stream %s: the frame in flight did not finish within %g s",
                            self.name, timeout)
                return
        if self.scene is not None and self._frame_size is not None:
            self._publish_scene(self.scene.end_all(self._frame_size, time.time()))

    def wait_opened(self, timeout: float) -> str:
        """Wait until the source left "opening" (or ``timeout``); return its state."""
        deadline = time.monotonic() + timeout
        while self.source_state is SourceState.OPENING and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.source_state

    @property
    def finished(self) -> bool:
        """True once the source ended (file without loop) and every frame was handled."""
        return not self._thread.is_alive() and self._thread.ident is not None

    def stalled(self, now: float | None = None) -> bool:
        """True when the worker has made no progress for ``stall_timeout`` seconds.

        Waiting is progress when the wait is explained: paused, reconnecting, ended.
        """
        now = time.monotonic() if now is None else now
        return not self.finished and now - self._progress > self.config.stall_timeout

    # -- the worker -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # never end quietly: the status says why, the daemon exits 1
            log.exception("stream %s: worker failed", self.name)
            self._on_source_state(SourceState.FAILED, f"worker failed: {exc}")
            self._worker_failed = True  # the reader's later states do not hide it
            self.reader.stop()
        log.debug("stream %s: worker finished", self.name)

    def _loop(self) -> None:
        next_due = 0.0
        while not self._stop.is_set():
            if self.paused:
                self._progress = time.monotonic()  # an explained wait is progress
                self.reader.get(timeout=0)  # discard: a paused stream does not queue frames
                self._stop.wait(0.1)
                continue
            fps = self.config.fps
            delay = next_due - time.monotonic()
            if fps and delay > 0 and self._stop.wait(delay):
                break
            frame = self.reader.get(timeout=0.25)
            if frame is None:
                state = self.reader.state
                if state.final:
                    break
                if state is not SourceState.STREAMING:  # opening / reconnecting: reader's job
                    self._progress = time.monotonic()
                continue
            next_due = time.monotonic() + 1.0 / fps if fps else 0.0
            self._handle(frame)

    def _handle(self, frame: Frame) -> None:
        try:
            self.process(frame)
        except EdgedError as exc:
            self.errors += 1
            log.warning("stream %s: frame %d: %s", self.name, frame.index, exc)
        except Exception:  # a bug must cost one frame, not the stream
            self.errors += 1
            log.exception("stream %s: frame %d failed", self.name, frame.index)
        self._progress = time.monotonic()

    def process(self, frame: Frame) -> dict[str, Any] | None:
        """Run one frame through the model; publish if the policy says so; return the result
        message (None when the policy held it back)."""
        start = time.monotonic()
        tensor, roi = self.preprocess(frame.image)
        preprocessed = time.monotonic()
        outputs = self.model.run(tensor)
        inferred = time.monotonic()
        post, publish = self._post, self._post.stream.publish
        result = post(outputs, roi)
        if isinstance(result, Detections):
            result = self._follow(frame, result)
        timings = Timings(start, preprocessed, inferred, time.monotonic())
        self.processed += 1
        self.fps.tick(timings.done)
        latency = timings.latency(frame)
        for key, value in latency.items():
            self.timings[key].add(value)
        self.inference_ms.add(latency["inference"])
        self.preview.offer(frame.image, result, post.stream)
        if not self._policy(result, publish, timings.done):
            self.skipped += 1
            return None
        message = self.results.build(frame, latency, result)
        self._publish("result", message)
        self.last_result = message
        self.published += 1
        if (isinstance(result, Detections) and publish.snapshot
                and timings.done - self._last_snapshot >= publish.snapshot_interval):
            self._last_snapshot = timings.done
            self._publish("snapshot", annotate.annotate_detections(frame.image, result,
                                                                   stream=self.config))
        return message

    def _follow(self, frame: Frame, result: Detections) -> Detections:
        """Masks and area bounds, then tracks, zones and lines: the detections the result
        publishes (with their track ids); events, occupancy and counts go out here."""
        if self.filter.active:
            result = self.filter(result)
        if self.scene is None:
            return result
        self._frame_size = (frame.image.shape[1], frame.image.shape[0])
        update = self.scene.update(frame, result)
        self._publish_scene(update)
        return update.detections

    def _publish_scene(self, update: SceneUpdate) -> None:
        for event in update.events:
            self._publish("events", event)
        for name, state in update.zones.items():
            self._publish(f"zones/{name}", state, retain=True)
        for name, state in update.lines.items():
            self._publish(f"lines/{name}", state, retain=True)
        for track, jpeg in update.snapshots.items():
            self._publish(f"events/{track}/snapshot", jpeg)

    def _track_snapshot(self, image: Any, track: Any) -> bytes:
        return annotate.track_snapshot(image, track.box,
                                       f"{track.label} #{track.id} {track.score:.2f}")

    def _policy(self, result: TaskResult, publish: PublishConfig, now: float) -> bool:
        """Whether this result goes out under the stream's publish policy."""
        if publish.policy == "every":
            return True
        if publish.policy == "rate":
            if now - self._last_publish < 1.0 / publish.rate:
                return False
            self._last_publish = now
            return True
        key = change_key(result)
        if self._last_key is not None and not changed(self._last_key, key):
            return False
        self._last_key = key
        return True

    # -- status, meta, commands --------------------------------------------------------------

    def _on_source_state(self, state: SourceState, detail: str) -> None:
        if self._worker_failed:
            return
        self.source_state, self.source_detail = state, detail
        log.debug("stream %s: source %s %s", self.name, state, detail)
        self.publish_status()

    def publish_status(self, state: str | None = None) -> None:
        """Publish the retained status (``state`` overrides the source's, e.g. "offline")."""
        self._publish("status", {
            "state": state or self.source_state, "detail": self.source_detail,
            "paused": self.paused, "time": round(time.time(), 3),
        }, retain=True)

    def meta(self) -> dict[str, Any]:
        """What this stream runs: for the retained meta topic."""
        info, config = self.model.info, self.config
        return {
            "stream": self.name, "task": info.task, "model": info.name,
            "source": redact(config.source.uri), "labels": list(info.labels),
            "input": {"width": info.input.width, "height": info.input.height},
            "threshold": config.threshold, "thresholds": config.thresholds,
            "fps": config.fps, "publish": config.publish.policy,
        }

    def stats(self) -> dict[str, Any]:
        """Counters and timings for the stats topic."""
        return {
            "state": self.source_state, "paused": self.paused,
            "fps": round(self.fps.rate(), 2), "processed": self.processed,
            "published": self.published, "skipped": self.skipped, "errors": self.errors,
            "frames": self.reader.frames, "drops": self.reader.drops,
            "decoded": self.reader.decoded,
            "latency_ms": {key: window.summary() for key, window in self.timings.items()},
        }

    def command(self, message: Any, dry_run: bool = False) -> dict[str, Any]:
        """Validate and apply a command; reply ``{"ok": true, ...}`` or ``{"ok": false,
        "error": "..."}``. All of a message's keys are checked before any is applied.
        ``dry_run``: only check, change nothing (the reply says what would happen)."""
        try:
            with self._lock:
                changes = parse_command(message)
                refused = [key for key in changes if not allowed(self.config, key)]
                if refused:
                    raise EdgedError(f"{refused[0]}: not allowed on this stream (commands: "
                                     f"{_allowed_text(self.config)})")
                paused, fields, reset = self.paused, {}, []
                for key, value in changes.items():
                    if key == "reset_lines":
                        reset = check_line_names(list(self.config.lines) if value is True
                                                 else value, self.config.lines)
                        if not reset:
                            raise EdgedError("reset_lines: this stream has no lines")
                    elif key in ("pause", "resume"):
                        paused = value == (key == "pause")
                    elif key == "thresholds":
                        fields[key] = {**self.config.thresholds, **value}
                    else:
                        fields[key] = value
                config = msgspec.structs.replace(self.config, **fields)
                post = Postprocessor(self.model.info, config, self.where)  # raises first
                if not dry_run:
                    self._apply(config, post, paused)
                    if reset and self.scene is not None:
                        for name, state in self.scene.reset_lines(reset, time.time()).items():
                            self._publish(f"lines/{name}", state, retain=True)
        except EdgedError as exc:
            return {"ok": False, "stream": self.name, "error": str(exc)}
        if not dry_run:
            log.info("stream %s: command applied: %s", self.name, changes)
        return {"ok": True, "stream": self.name, "applied": changes}

    def reconfigure(self, config: StreamConfig) -> None:
        """Take a reloaded configuration whose changes are all live settings; a paused stream
        stays paused. Raises ``EdgedError`` (nothing changed) if they do not fit the model."""
        with self._lock:
            self._apply(config, Postprocessor(self.model.info, config, self.where),
                        self.paused)

    def _apply(self, config: StreamConfig, post: Postprocessor, paused: bool) -> None:
        self.config, self._post, self.paused = config, post, paused
        if self.scene is not None:
            self.scene.retune(config)
        self.publish_status()
        self._publish("meta", self.meta(), retain=True)

    def _publish(self, kind: str, payload: bytes | dict[str, Any], retain: bool = False) -> None:
        for sink in self.sinks:
            try:
                sink.publish(f"{self.name}/{kind}", payload, retain=retain)
            except EdgedError as exc:
                log.warning("stream %s: publishing %s failed: %s", self.name, kind, exc)


# ---------------------------------------------------------------------------------------------
# Publish policy "change"


def change_key(result: TaskResult) -> Any:
    """What must differ for a result to count as new: classify the top-1 label, detect the
    multiset of labels (so a count change counts), segment the class fractions."""
    if isinstance(result, Classification):
        return result.classes[0].label if result.classes else None
    if isinstance(result, Detections):
        return Counter(d.label for d in result.detections)
    return {c.label: c.fraction for c in result.classes}


def changed(old: Any, new: Any) -> bool:
    """Whether ``new`` differs from ``old`` (keys of ``change_key``)."""
    if isinstance(old, dict) and not isinstance(old, Counter):  # segment fractions
        return any(abs(old.get(k, 0.0) - new.get(k, 0.0)) > SEGMENT_CHANGE
                   for k in old.keys() | new.keys())
    return old != new


# ---------------------------------------------------------------------------------------------
# Commands


# Commands pause / resume the stream and change these live settings of StreamConfig, checked
# by the fields' own declarations.
COMMANDS: tuple[str, ...] = get_args(Command)
SETTING_COMMANDS = ("threshold", "thresholds", "fps")


def allowed(config: StreamConfig, command: str) -> bool:
    """Whether the stream's ``commands`` setting lets ``command`` through."""
    return config.commands == "all" or (config.commands != "off" and command in config.commands)


def _allowed_text(config: StreamConfig) -> str:
    return config.commands if isinstance(config.commands, str) else ", ".join(config.commands)


def command_all(pipelines: dict[str, Pipeline], message: Any) -> dict[str, Any]:
    """A command for every stream: checked on all of them first, applied only if every stream
    accepts it, so a refusal by one stream leaves all of them unchanged."""
    errors = [f"{name}: {reply['error']}" for name, pipeline in pipelines.items()
              if not (reply := pipeline.command(message, dry_run=True))["ok"]]
    if errors:
        return {"ok": False, "error": "; ".join(errors)}
    return {"ok": True, "streams": {name: pipeline.command(message)
                                    for name, pipeline in pipelines.items()}}


def parse_command(message: Any) -> dict[str, Any]:
    """Check a command message's keys and values (settings exactly as the configuration file
    checks them); raise ``EdgedError`` (one line) naming the first problem. Labels are checked
    against the model when the settings are applied."""
    if not isinstance(message, dict) or not message:
        raise EdgedError('command must be a non-empty JSON object, e.g. {"threshold": 0.4}')
    if "pause" in message and "resume" in message:
        raise EdgedError("pause and resume: give one of them, not both")
    changes: dict[str, Any] = {}
    for key, value in message.items():
        if key in SETTING_COMMANDS:
            changes[key] = check_value(StreamConfig, key, value, key)
        elif key == "reset_lines":
            if value is not True and not (isinstance(value, list) and value
                                          and all(isinstance(v, str) for v in value)):
                raise EdgedError(f"reset_lines: must be true (every line) or a list of line "
                                 f"names, got {describe(value)}")
            changes[key] = value
        elif key in COMMANDS:
            if not isinstance(value, bool):
                raise EdgedError(f"{key}: must be true or false, got {describe(value)}")
            changes[key] = value
        else:
            name = key if str(key).isprintable() else repr(key)
            raise EdgedError(f"{name}: unknown command{did_you_mean(key, COMMANDS)}")
    return changes
