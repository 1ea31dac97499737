"""Soak: the real daemon for an hour on a looped clip, its broker killed every few minutes.

    .venv/bin/python benchmarks/soak.py [--minutes 60] [--kill-every 180] [--down 20] [--fps 5]
        [--clip ../shared/samples/bikes.mp4] [--model FILE.onnx] [--out DIR]
    nohup .venv/bin/python benchmarks/soak.py > /tmp/soak.out 2>&1 &     # the hour, detached
    .venv/bin/python benchmarks/soak.py --minutes 3 --kill-every 60 --down 10  # a quick trial

What runs, all on 127.0.0.1:
- a mosquitto broker on a free port (persistence on, saved every second, no limit on queued
  messages, so a subscriber's session outlives a SIGKILL), started in a session of its own;
- a persistent subscriber (clean session off, QoS 1) recording every result's (stream, seq) on
  ``edged/soak/+/result`` and the daemon's ``edged/soak/stats``;
- ``python -m edged run --config`` with one classify stream on the clip (``loop: true``,
  ``fps``), a converted model (default: the first ``mobilenet_v2_imagenet.onnx`` in
  ~/.cache/edged-tests/), a state dir in a temporary folder, stats every 10 s, keepalive 5 s.

Every ``--kill-every`` seconds the broker gets SIGKILL, stays down ``--down`` seconds and starts
again on the same port. Every 10 s the daemon's VmRSS, RssAnon (/proc/PID/status) and CPU time
(utime + stime, /proc/PID/stat) are sampled. At the end (``--minutes``, or Ctrl-C / SIGTERM
earlier) the stream is paused with an MQTT command so that nothing new is produced, the outbox is
drained with the broker up (until a stats message says ``queued`` 0, at most 60 s; a second
Ctrl-C skips this), the daemon is stopped and the report printed: results produced (the stream's
``published`` counter, or the highest seq) vs delivered (distinct seqs) and repeats, lost, broker
kills, the RSS and RssAnon slopes (least squares after a warm-up of 5 minutes or 10 % of the run,
whichever is less), CPU ms per result per 10-minute window. The report, the samples (CSV), a
plot of RSS and delivered results over time (when matplotlib is importable), the daemon's log,
the broker's log and the configuration go to ``--out`` (default
benchmarks/results/soak-<date>/, git-ignored). Targets: RSS slope < 1 MB/h, 0 lost.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CLIP = REPO.parent / "shared" / "samples" / "bikes.mp4"
MODEL_GLOB = "~/.cache/edged-tests/*/mobilenet_v2_imagenet.onnx"
NAME = "benchmarks/soak.py"
HOST = "127.0.0.1"
DEVICE = "soak"
STREAM = "bikes"
SAMPLE_EVERY = 10.0  # seconds between samples of the daemon's RSS and CPU time
PROGRESS_EVERY = 60.0  # seconds between progress lines on stderr at least
STATS_INTERVAL = 10  # the daemon's stats_interval
KEEPALIVE = 5
DRAIN_TIMEOUT = 60.0
WINDOW = 600.0  # seconds per row of the CPU table
TARGET_SLOPE_MB_H = 1.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Interrupted(Exception):
    """SIGTERM, turned into the same early stop as Ctrl-C."""


def fail(message: str) -> NoReturn:
    """Exit with one line on stderr."""
    print(f"{NAME}: {message}", file=sys.stderr)
    sys.exit(2)


def log(message: str) -> None:
    """One progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Broker:
    """A mosquitto broker on one plain loopback listener; as tests/helpers/broker.py's
    ``Mosquitto`` (persistence on, same port across restarts), plus: the state is saved every
    second, so a persistent session survives a SIGKILL; no bound on queued messages, so the
    broker drops nothing of its own; a session of its own, so Ctrl-C reaches only this script."""

    def __init__(self, workdir: Path) -> None:
        if not shutil.which("mosquitto"):
            fail("mosquitto is not installed (apt-get install mosquitto)")
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"""\
user {pwd.getpwuid(os.getuid()).pw_name}
persistence true
persistence_location {workdir}/
autosave_interval 1
max_queued_messages 0
log_dest file {workdir}/mosquitto.log
log_type error
log_type warning
log_type notice
listener {self.port} {HOST}
allow_anonymous true
""")

    @property
    def up(self) -> bool:
        """Whether the broker process runs."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start the broker and wait until it accepts connections; retried while the port is
        briefly taken (an outgoing connection may hold it as its local port)."""
        deadline = time.monotonic() + timeout
        while True:
            self.process = subprocess.Popen(["mosquitto", "-c", str(self.conf)],
                                            stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True)
            while self.process.poll() is None:
                try:
                    socket.create_connection((HOST, self.port), timeout=0.5).close()
                    return
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
            self.kill()
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto does not start on {HOST}:{self.port}: "
                                   f"{self.log_tail()}")
            time.sleep(1.0)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown; the state saved last is what the next start has."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        """Stop gracefully (SIGTERM)."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def log_tail(self) -> str:
        """The last line of the broker's log."""
        path = self.workdir / "mosquitto.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return lines[-1] if lines else "(no log)"


class Recorder:
    """A persistent MQTT subscriber (clean session off, QoS 1): every result's (stream, seq)
    with its frame's capture time, the daemon's latest stats, replies to commands."""

    def __init__(self, port: int) -> None:
        self.prefix = f"edged/{DEVICE}"
        self.seqs: dict[tuple[str, int], float] = {}  # (stream, seq) -> frame epoch
        self.received = 0  # result messages, repeats included
        self.unreadable = 0
        self.stats: dict[str, Any] | None = None
        self.stats_at = 0.0  # monotonic time the latest stats arrived
        self.replies: list[tuple[float, dict[str, Any]]] = []
        self.connects: list[bool] = []  # session_present of each CONNACK
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-sub-{os.getpid()}",
                                  clean_session=False)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect(HOST, port, keepalive=KEEPALIVE)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the subscriber did not subscribe within 10 s")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        self.connects.append(bool(flags.session_present))
        # Subscribing again is harmless when the broker kept the session, and needed when not.
        client.subscribe([(f"{self.prefix}/+/result", 1), (f"{self.prefix}/stats", 1),
                          (f"{self.prefix}/+/set/reply", 1)])

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        try:
            payload = json.loads(message.payload)
        except (ValueError, UnicodeDecodeError):
            payload = None
        with self._lock:
            if message.topic.endswith("/result"):
                self.received += 1
                try:
                    key = (payload["stream"], int(payload["seq"]))
                    self.seqs[key] = float(payload["frame"]["epoch"])
                except (TypeError, KeyError, ValueError):
                    self.unreadable += 1
            elif message.topic.endswith("/stats") and isinstance(payload, dict):
                self.stats, self.stats_at = payload, now
            elif message.topic.endswith("/reply") and isinstance(payload, dict):
                self.replies.append((now, payload))

    def delivered(self) -> int:
        """Distinct results received so far."""
        with self._lock:
            return len(self.seqs)

    def latest_stats(self) -> tuple[dict[str, Any] | None, float]:
        """The latest stats message and when it arrived (monotonic)."""
        with self._lock:
            return self.stats, self.stats_at

    def command(self, payload: dict[str, Any], timeout: float = 10.0) -> float | None:
        """Send a command to the stream; the monotonic time its ``ok`` reply arrived, or None."""
        sent = time.monotonic()
        self.client.publish(f"{self.prefix}/{STREAM}/set", json.dumps(payload), qos=1)
        while time.monotonic() < sent + timeout:
            with self._lock:
                for at, reply in self.replies:
                    if at >= sent and reply.get("ok"):
                        return at
            time.sleep(0.1)
        return None

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Sample:
    """One reading of the daemon, ``t`` seconds after it started."""

    t: float
    epoch: float
    rss_mb: float
    rss_anon_mb: float
    cpu_s: float
    delivered: int
    published: int | None
    queued: int | None
    broker_up: bool


@dataclass
class Run:
    """What happened during the soak: samples, broker outages (start, end in seconds after the
    daemon started), unplanned events."""

    samples: list[Sample] = field(default_factory=list)
    outages: list[tuple[float, float | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duration: float = 0.0
    interrupted: bool = False


def read_proc(pid: int) -> tuple[float, float, float]:
    """VmRSS and RssAnon in MB and CPU time (user + system) in seconds of process ``pid``."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                fields[key] = int(value.split()[0]) / 1024  # kB -> MB
    with open(f"/proc/{pid}/stat") as f:
        after_name = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces
    cpu = (int(after_name[11]) + int(after_name[12])) / CLK_TCK  # fields 14 and 15: utime, stime
    return fields["VmRSS"], fields["RssAnon"], cpu


def stream_counters(stats: dict[str, Any] | None) -> tuple[int | None, int | None, int | None,
                                                            int | None]:
    """The stream's ``published`` and the MQTT sink's ``queued``, ``inflight``, ``dropped``
    from a stats message (None where absent)."""
    if stats is None:
        return None, None, None, None
    published = stats.get("streams", {}).get(STREAM, {}).get("published")
    sink = next((s for s in stats.get("sinks", []) if "queued" in s), {})
    return published, sink.get("queued"), sink.get("inflight"), sink.get("dropped")


def write_config(directory: Path, port: int, model: Path, clip: Path, fps: float) -> Path:
    """The deployment YAML the daemon runs."""
    config = {
        "device": DEVICE,
        "state_dir": str(directory / "state"),
        "stats_interval": STATS_INTERVAL,
        "streams": [{"name": STREAM, "task": "classify", "model": str(model), "fps": fps,
                     "source": {"uri": str(clip), "loop": True}}],
        "mqtt": {"host": HOST, "port": port, "keepalive": KEEPALIVE},
    }
    path = directory / "edged.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def soak(args: argparse.Namespace, broker: Broker, recorder: Recorder,
         daemon: subprocess.Popen, started: float, run: Run) -> None:
    """The soak proper: kill and restart the broker on schedule, sample the daemon, until
    ``--minutes`` have passed, the daemon exits, or Ctrl-C / SIGTERM."""
    end = started + args.minutes * 60
    next_sample, next_kill, last_progress = started, started + args.kill_every, -PROGRESS_EVERY
    restart_at: float | None = None
    try:
        while True:
            now = time.monotonic()
            if daemon.poll() is not None:
                run.notes.append(f"the daemon exited with status {daemon.returncode} after "
                                 f"{now - started:.0f} s (see daemon.log)")
                log(run.notes[-1])
                break
            if now >= end:
                break
            if restart_at is None and now >= next_kill:
                next_kill += args.kill_every
                if now + args.down < end:  # the broker must be up for the drain
                    broker.kill()
                    run.outages.append((now - started, None))
                    restart_at = now + args.down
                    log(f"broker killed (SIGKILL), {len(run.outages)} so far; down for "
                        f"{args.down:g} s")
            if restart_at is not None and now >= restart_at:
                broker.start()
                run.outages[-1] = (run.outages[-1][0], time.monotonic() - started)
                restart_at = None
            elif restart_at is None and not broker.up:
                run.notes.append(f"the broker died unplanned at {now - started:.0f} s "
                                 f"({broker.log_tail()}); restarted")
                log(run.notes[-1])
                broker.start()
            if now >= next_sample:
                next_sample += SAMPLE_EVERY
                sample = take_sample(daemon.pid, recorder, started, broker.up)
                run.samples.append(sample)
                if sample.t - last_progress >= PROGRESS_EVERY - 1:  # not one sample late
                    last_progress = sample.t
                    log(progress(run))
            wake = min(next_sample, end, restart_at or end,
                       next_kill if restart_at is None else end)
            time.sleep(max(0.0, min(1.0, wake - time.monotonic())))
    except (KeyboardInterrupt, Interrupted):
        run.interrupted = True
        log("interrupted: stopping early, the report covers what ran")
    run.duration = time.monotonic() - started
    if daemon.poll() is None:
        run.samples.append(take_sample(daemon.pid, recorder, started, broker.up))
    if not broker.up:
        broker.start()
        if run.outages and run.outages[-1][1] is None:
            run.outages[-1] = (run.outages[-1][0], time.monotonic() - started)


def take_sample(pid: int, recorder: Recorder, started: float, broker_up: bool) -> Sample:
    """Read the daemon's memory and CPU time, with the results delivered so far."""
    rss, anon, cpu = read_proc(pid)
    published, queued, _, _ = stream_counters(recorder.latest_stats()[0])
    return Sample(round(time.monotonic() - started, 2), round(time.time(), 3), round(rss, 2),
                  round(anon, 2), round(cpu, 2), recorder.delivered(), published, queued,
                  broker_up)


def progress(run: Run) -> str:
    """A progress line: the latest sample with the CPU share since the previous line's."""
    last = run.samples[-1]
    earlier = [s for s in run.samples if s.t <= last.t - PROGRESS_EVERY + 1] or run.samples[:1]
    base = earlier[-1]
    cpu = 100 * (last.cpu_s - base.cpu_s) / (last.t - base.t) if last.t > base.t else 0.0
    return (f"{last.t / 60:5.1f} min: RSS {last.rss_mb:.1f} MB (anon {last.rss_anon_mb:.1f}), "
            f"CPU {cpu:.0f} %, delivered {last.delivered}, published {last.published}, "
            f"queued {last.queued}, broker {'up' if last.broker_up else 'down'}, "
            f"kills {len(run.outages)}")


def drain(recorder: Recorder, produced_hint: int) -> str:
    """Pause the stream, then wait (broker up) until a stats message taken after the pause says
    the outbox is empty (at most DRAIN_TIMEOUT), then briefly for the subscriber to have every
    result. Returns a few words on how it went; Ctrl-C ends it early."""
    start, queued = time.monotonic(), None
    try:
        paused = recorder.command({"pause": True}, timeout=30)
        if paused is None:
            return "no reply to the pause command; not drained"
        while time.monotonic() - start < DRAIN_TIMEOUT:
            stats, at = recorder.latest_stats()
            published, queued, inflight, _ = stream_counters(stats)
            if at > paused + 1.0 and queued == 0 and not inflight:
                grace = time.monotonic() + 5
                while recorder.delivered() < (published or produced_hint) and \
                        time.monotonic() < grace:
                    time.sleep(0.1)
                return f"outbox empty {time.monotonic() - start:.0f} s after the pause"
            time.sleep(0.5)
        return f"outbox not empty after {DRAIN_TIMEOUT:.0f} s (queued {queued})"
    except (KeyboardInterrupt, Interrupted):
        return "drain skipped (interrupted)"


def stop_daemon(daemon: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL after 30 s; the exit status."""
    if daemon.poll() is None:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    return daemon.returncode


def slope_mb_h(samples: list[Sample], attr: str, after: float) -> float | None:
    """Least-squares slope (MB/h) of ``attr`` over the samples taken ``after`` seconds on."""
    points = [(s.t, getattr(s, attr)) for s in samples if s.t >= after]
    if len(points) < 3:
        return None
    t, value = np.array(points).T
    return float(np.polyfit(t / 3600, value, 1)[0])


def produced_by(recorder: Recorder) -> tuple[np.ndarray, np.ndarray]:
    """(frame epochs, seqs) of the delivered results of the stream, by seq: how many results
    existed at a given time (a result goes out milliseconds after its frame is captured)."""
    pairs = sorted((seq, epoch) for (stream, seq), epoch in recorder.seqs.items()
                   if stream == STREAM)
    if not pairs:
        return np.zeros(0), np.zeros(0)
    seqs, epochs = np.array(pairs).T
    return np.maximum.accumulate(epochs), seqs


def cpu_table(run: Run, recorder: Recorder) -> list[str]:
    """Rows of CPU per result, CPU share and memory at the end, per WINDOW of the run."""
    samples = run.samples
    if len(samples) < 2:
        return ["  (fewer than two samples)"]
    t = np.array([s.t for s in samples])
    cpu = np.array([s.cpu_s for s in samples])
    epochs, seqs = produced_by(recorder)
    offset = samples[0].epoch - samples[0].t  # wall time of t = 0

    def count(at: float) -> float:
        index = int(np.searchsorted(epochs, offset + at, side="right"))
        return float(seqs[index - 1]) if index else 0.0

    rows = [f"  {'minutes':>9}{'results':>9}{'CPU s':>8}{'ms/result':>11}{'CPU %':>7}"
            f"{'RSS MB':>9}{'RssAnon':>9}"]
    edges = [*np.arange(0, t[-1], WINDOW), t[-1]]
    if len(edges) > 2 and edges[-1] - edges[-2] < 60:  # a last sliver joins the window before
        del edges[-2]
    for lo, hi in zip(edges, edges[1:], strict=False):
        results = count(hi) - count(lo)
        cpu_s = float(np.interp(hi, t, cpu) - np.interp(lo, t, cpu))
        at_end = min(samples, key=lambda s, hi=hi: abs(s.t - hi))
        per = f"{1000 * cpu_s / results:.1f}" if results else "-"
        rows.append(f"  {f'{lo / 60:.0f}-{hi / 60:.0f}':>9}{results:>9.0f}{cpu_s:>8.1f}"
                    f"{per:>11}{100 * cpu_s / (hi - lo):>7.1f}{at_end.rss_mb:>9.1f}"
                    f"{at_end.rss_anon_mb:>9.1f}")
    return rows


def ranges(values: list[int]) -> list[tuple[int, int]]:
    """Sorted integers as runs of consecutive ones: [(first, last), ...]."""
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs


def warmup_s(run: Run) -> float:
    """Seconds left out of the slopes: 5 minutes or 10 % of the run, whichever is less."""
    return min(300.0, 0.1 * run.duration)


def report(args: argparse.Namespace, run: Run, recorder: Recorder, drained: str,
           exit_status: int | None, header: str) -> list[str]:
    """The report's lines."""
    stats, _ = recorder.latest_stats()
    published, queued, _, dropped = stream_counters(stats)
    mine = sorted(seq for stream, seq in recorder.seqs if stream == STREAM)
    highest = mine[-1] if mine else 0
    produced = max(published or 0, highest)
    delivered = len(mine)
    repeats = recorder.received - len(recorder.seqs) - recorder.unreadable
    lost = produced - delivered
    minutes = run.duration / 60
    lines = [header,
             f"{'duration':26}{minutes:.1f} min ({run.duration:.0f} s)"
             f"{', stopped early (Ctrl-C)' if run.interrupted else ''}",
             f"{'broker kills (SIGKILL)':26}{len(run.outages)}, each down "
             f"{np.mean([b - a for a, b in run.outages if b is not None] or [0]):.1f} s",
             f"{'results produced':26}{produced} (stats: published {published}; "
             f"highest seq {highest})",
             f"{'results delivered':26}{delivered} distinct, {repeats} repeats"
             f"{f', {recorder.unreadable} unreadable' if recorder.unreadable else ''}",
             f"{'lost':26}{lost} ({drained}; queued {queued}, dropped {dropped}); "
             f"target 0: {'met' if lost == 0 else 'NOT met'}"]
    missing = sorted(set(range(1, produced + 1)) - set(mine))
    if missing:
        epochs, seqs = produced_by(recorder)
        offset = run.samples[0].epoch - run.samples[0].t if run.samples else 0.0
        for first, last in ranges(missing)[:8]:
            at = (float(np.interp(first, seqs, epochs)) - offset) if len(seqs) else 0.0
            near = [f"outage {a:.0f}-{b or 0:.0f} s" for a, b in run.outages
                    if a - 30 <= at <= (b or run.duration) + 30]
            lines.append(f"{'':26}missing seq {first}-{last} ({last - first + 1}), produced "
                         f"at about {at:.0f} s{'; ' + near[0] if near else ''}")
    warmup = warmup_s(run)
    after = [s for s in run.samples if s.t >= warmup]
    for label, attr in (("RSS (VmRSS)", "rss_mb"), ("RssAnon", "rss_anon_mb")):
        slope = slope_mb_h(run.samples, attr, warmup)
        half = slope_mb_h(run.samples, attr, warmup + (run.duration - warmup) / 2)
        if slope is None or not after:
            lines.append(f"{label:26}too few samples after the warm-up of {warmup:.0f} s")
            continue
        values = [getattr(s, attr) for s in after]
        second = "" if half is None else f" (second half {half:+.2f} MB/h)"
        verdict = ""
        if attr == "rss_mb":
            verdict = (f"; target < {TARGET_SLOPE_MB_H:g} MB/h: "
                       f"{'met' if slope < TARGET_SLOPE_MB_H else 'NOT met'}")
        lines.append(f"{label:26}{values[0]:.1f} -> {values[-1]:.1f} MB (max {max(values):.1f}),"
                     f" slope {slope:+.2f} MB/h after a {warmup / 60:.1f} min warm-up"
                     f"{second}{verdict}")
    subscriber = recorder.connects
    lines.append(f"{'subscriber connects':26}{len(subscriber)}, session kept by the broker "
                 f"{sum(subscriber[1:])}/{len(subscriber) - 1}")
    lines.append(f"{'daemon exit status':26}{exit_status}")
    lines += run.notes
    lines.append("CPU per result (the daemon's user + system time), by 10-minute window; the "
                 "first includes start-up:")
    lines += cpu_table(run, recorder)
    return lines


def plot(run: Run, path: Path, warmup: float) -> str:
    """VmRSS and RssAnon after the warm-up, and delivered results, over time; broker outages
    shaded (matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return "plot: skipped (matplotlib is not importable here; samples.csv has the data)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settled = [s for s in run.samples if s.t >= warmup] or run.samples
    figure, panels = plt.subplots(3, 1, sharex=True, figsize=(9, 8))
    for axes, attr, label in ((panels[0], "rss_mb", "VmRSS MB"),
                              (panels[1], "rss_anon_mb", "RssAnon MB")):
        axes.plot([s.t / 60 for s in settled], [getattr(s, attr) for s in settled])
        axes.set_ylabel(label)
    panels[2].plot([s.t / 60 for s in run.samples], [s.delivered for s in run.samples])
    panels[2].set_ylabel("results delivered")
    panels[2].set_xlabel("minutes")
    for axes in panels:
        for start, end in run.outages:
            axes.axvspan(start / 60, (end or run.duration) / 60, color="0.85")
    figure.suptitle(f"edged soak (memory after a {warmup / 60:.1f} min warm-up; broker "
                    "outages shaded)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return f"plot: {path}"


def write_samples(run: Run, path: Path) -> None:
    """The samples as CSV."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(run.samples[0])) if run.samples
                                else ["t"])
        writer.writeheader()
        for sample in run.samples:
            writer.writerow(asdict(sample))


def revision() -> str:
    """The checkout's commit, and whether the tree has changes (the daemon runs the tree)."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"{commit}{' + uncommitted changes' if dirty else ''}"


class Parser(argparse.ArgumentParser):
    """Argument errors as one line, no usage block."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def parse_args() -> argparse.Namespace:
    """The command line, checked; exits with one line on a problem."""
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="length of the soak")
    parser.add_argument("--kill-every", type=float, default=180.0,
                        help="seconds between broker kills (SIGKILL)")
    parser.add_argument("--down", type=float, default=20.0,
                        help="seconds the broker stays down after each kill")
    parser.add_argument("--fps", type=float, default=5.0, help="the stream's fps")
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP,
                        help="video file, looped (default: ../shared/samples/bikes.mp4)")
    parser.add_argument("--model", type=Path,
                        help=f"classify ONNX file (default: the first {MODEL_GLOB})")
    parser.add_argument("--out", type=Path, help="report folder (default: "
                        "benchmarks/results/soak-<date>/)")
    args = parser.parse_args()
    if not 0 < args.minutes <= 7 * 24 * 60:
        fail(f"--minutes: must be more than 0 and at most a week, not {args.minutes:g}")
    if not args.kill_every > 0:
        fail(f"--kill-every: must be more than 0, not {args.kill_every:g}")
    if not 0 <= args.down < args.kill_every:
        fail(f"--down: must be 0 or more and less than --kill-every ({args.kill_every:g}), "
             f"not {args.down:g}")
    if not 0.001 <= args.fps <= 1000:
        fail(f"--fps: must be 0.001..1000, not {args.fps:g}")
    args.clip = args.clip.expanduser().resolve()
    if not args.clip.is_file():
        fail(f"--clip: no such file: {args.clip}")
    if args.model is None:
        found = sorted(glob.glob(os.path.expanduser(MODEL_GLOB)))
        if not found:
            fail(f"no model: none matches {MODEL_GLOB} (run the tests once, or give "
                 "--model FILE.onnx)")
        args.model = Path(found[0])
    args.model = args.model.expanduser().resolve()
    if not args.model.is_file():
        fail(f"--model: no such file: {args.model}")
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / f"soak-{time.strftime('%Y-%m-%d')}"
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"--out: cannot create {args.out}: {exc.strerror}")
    return args


def main() -> None:
    args = parse_args()

    def terminate(signum: int, frame: Any) -> None:
        raise Interrupted()

    signal.signal(signal.SIGTERM, terminate)
    cpu_model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "unknown CPU")
    header = (f"edged soak: classify on {args.clip.name} (loop, {args.fps:g} fps), "
              f"{args.model.name} ({args.model.parent.name}), broker SIGKILLed every "
              f"{args.kill_every:g} s for {args.down:g} s; {cpu_model}, {os.cpu_count()} cores, "
              f"{revision()}, load average at start {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="edged-soak-") as tmp:
        work = Path(tmp)
        broker = Broker(work / "mosquitto")
        broker.start()
        recorder: Recorder | None = None
        daemon: subprocess.Popen | None = None
        run = Run()
        drained, exit_status = "not drained", None
        try:
            recorder = Recorder(broker.port)
            config = write_config(work, broker.port, args.model, args.clip, args.fps)
            shutil.copy(config, args.out / "edged.yaml")
            with (args.out / "daemon.log").open("w") as daemon_log:
                daemon = subprocess.Popen(
                    [sys.executable, "-m", "edged", "run", "--config", str(config)], cwd=REPO,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=daemon_log,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
            started = time.monotonic()
            log(f"soak: {args.minutes:g} min, broker {HOST}:{broker.port}, daemon pid "
                f"{daemon.pid}, output {args.out}")
            soak(args, broker, recorder, daemon, started, run)
            if daemon.poll() is None:
                stats, _ = recorder.latest_stats()
                log("draining: stream paused, waiting for the outbox to empty")
                drained = drain(recorder, stream_counters(stats)[0] or 0)
        finally:
            if daemon is not None:
                exit_status = stop_daemon(daemon)
            if recorder is not None:
                recorder.close()
            broker.stop()
            if (work / "mosquitto" / "mosquitto.log").exists():
                shutil.copy(work / "mosquitto" / "mosquitto.log", args.out / "mosquitto.log")
        header += f", at end {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}"
        lines = report(args, run, recorder, drained, exit_status, header)
    write_samples(run, args.out / "samples.csv")
    lines.append(f"samples: {args.out / 'samples.csv'}; daemon log: {args.out / 'daemon.log'}")
    lines.append(plot(run, args.out / "soak.png", warmup_s(run)) if run.samples
                 else "plot: no samples")
    text = "\n".join(lines)
    print(text, flush=True)
    (args.out / "report.txt").write_text(text + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        fail("interrupted before the soak started or after its report")
