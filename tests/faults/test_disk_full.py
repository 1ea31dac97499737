"""A full disk under the outbox: a 1 MB tmpfs mounted as its directory (the tests run as root),
filled while the broker is away. Delivery resumes at full speed once the broker is back, the
results refused for lack of space are counted with one warning, acknowledgements the disk
refuses are kept in memory, and the outbox takes results again once delivery freed space."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until
from helpers.broker import Mosquitto, Subscriber

from edged.errors import EdgedError
from edged.outbox import Outbox
from edged.sinks.mqtt import MqttSink

pytest_plugins = ["helpers.broker"]

TOPIC = "edged/full/cam/result"
DELIVERY_BOUND = 20.0  # seconds for everything stored to be delivered once the broker is back


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs: a disk that fills in a second without touching the real one."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)],
                   check=True, capture_output=True)
    try:
        yield mount_point
    finally:
        # Lazily: a failed test may have left a file open there.
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True, capture_output=True)


def fill_up(directory: Path) -> Path:
    """Write a ballast file until the file system has not one free block left."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 16, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return ballast



def sequences(sub: Subscriber) -> list[int]:
    """Sequences in order of first arrival (QoS 1 may deliver one twice)."""
    seen: set[int] = set()
    values = [json.loads(m.payload)["sequence"] for m in sub.on(TOPIC)]
    return [v for v in values if not (v in seen or seen.add(v))]


def test_delivery_resumes_at_full_speed_after_the_disk_filled(
        private_mosquitto: Mosquitto, tiny_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The fault campaign's case: a fresh outbox on a 1 MB disk, the broker away while results
    fill it, then back. Everything stored is delivered within DELIVERY_BOUND (it used to creep
    at one result per half second, an OSError logged at each step)."""
    sub = Subscriber(private_mosquitto, TOPIC, persistent=True)  # its session outlives the stop
    private_mosquitto.stop()
    # The sink retries every 2 s, the subscriber every 0.5 s at most: the subscriber is back
    # first, so what is delivered reaches it rather than its (1000-message) offline queue.
    sink = MqttSink(private_mosquitto.config(), "full", tiny_disk / "outbox",
                    reconnect_min=2.0, reconnect_max=2.0)
    sink.start()
    try:
        with caplog.at_level(logging.WARNING):
            published = 0
            while sink.stats()["dropped"] < 200:  # well past full
                sink.publish("cam/result", {"sequence": published, "pad": "x" * 350})
                published += 1
                assert published < 20_000, "the 1 MB disk never filled"
            stats = sink.stats()
            stored, refused = stats["queued"], stats["dropped"]
            assert stored + refused == published and stored > 1000 and stats["sent"] == 0

            private_mosquitto.start()
            assert wait_until(sub.client.is_connected, 10)
            assert wait_until(lambda: sink.connected, 10)
            back = time.monotonic()
            delivered = wait_until(lambda: sink.stats()["sent"] >= stored, DELIVERY_BOUND)
            elapsed = time.monotonic() - back
            stats = sink.stats()
            assert delivered, f"{stats['sent']} of {stored} delivered in {elapsed:.1f} s: {stats}"
            print(f"{stored} results stored on the full disk delivered in {elapsed:.2f} s "
                  f"after the broker was back")
            assert sub.wait(lambda: len(sequences(sub)) >= stored, 10)
            assert sequences(sub) == list(range(stored))  # all of them, in order
            assert stats["queued"] == 0 and stats["dropped"] == refused
            assert stats["expired"] == stats["quarantined"] == 0

            # Delivery freed the space: new results are stored and delivered again.
            for i in range(published, published + 100):
                sink.publish("cam/result", {"sequence": i, "pad": "x" * 350})
            assert sub.wait(lambda: len(sequences(sub)) >= stored + 100, 10)
            assert sequences(sub)[stored:] == list(range(published, published + 100))
            assert sink.stats()["dropped"] == refused
    finally:
        sink.close(timeout=0.5)
        sub.close()
    # The refused results were reported once, and nothing failed in a loop.
    full = [r for r in caplog.records if "No space left" in r.getMessage()]
    assert len(full) == 1 and "cannot store a message" in full[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_acknowledgements_the_disk_refuses_are_kept_and_written_later(
        tiny_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The cursor file cannot get its block (the disk filled before it was ever written):
    acknowledging still works, in memory, with one warning; once delivery has freed space the
    outbox takes results again, the next sync writes the cursor, and a restart does not resend
    what was delivered."""
    directory = tiny_disk / "outbox"
    outbox = Outbox(directory)
    ids = [outbox.append(TOPIC, b'{"sequence":%d,"pad":"%s"}' % (i, b"x" * 100), 1)
           for i in range(200)]
    outbox.close()
    (directory / "acked").unlink()  # as if the disk had filled before the first write
    fill_up(tiny_disk)
    big = b"x" * 8192  # more than the segment's last page holds

    with caplog.at_level(logging.INFO, logger="edged.outbox"):
        outbox = Outbox(directory)
        with pytest.raises(EdgedError, match="cannot store a message"):
            outbox.append(TOPIC, big, 1)
        assert [e.id for e in outbox.peek(500)] == ids
        for entry_id in ids:
            outbox.ack(entry_id)  # never raises
        assert len(outbox) == 0 and outbox.peek(10) == []
        outbox.sync()  # retried, still failing: no second warning
        outbox.maybe_sync()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "cannot write the cursor" in warnings[0], warnings

        # Every record of the segment was delivered: a fresh segment replaces it, which frees
        # its space, and the cursor can be written again.
        later = outbox.append(TOPIC, big, 1)
        outbox.sync()
        assert any("can write the cursor again" in r.getMessage() for r in caplog.records)
        outbox.close()
    reopened = Outbox(directory)
    assert [(e.id, e.payload) for e in reopened.peek(500)] == [(later, big)]
    reopened.close()
