"""The on-disk outbox: order, acknowledgement, limits, restarts, crashes and damaged files."""

from __future__ import annotations

import json
import logging
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from helpers import wait_until
from helpers.broker import (  # noqa: F401 (fixtures)
    Mosquitto,
    Subscriber,
    free_port,
    mosquitto_fixture,
    mqtt_certs_fixture,
)

from edged.config import MqttConfig
from edged.errors import EdgedError
from edged.outbox import MAGIC, Outbox
from edged.sinks.mqtt import MqttSink

TOPIC = "edged/dev/cam/result"


def payload(i: int) -> bytes:
    return b'{"sequence":%d}' % i


def fill(outbox: Outbox, n: int, start: int = 0) -> list[int]:
    return [outbox.append(TOPIC, payload(i), 1) for i in range(start, start + n)]


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def write_cursor(directory: Path, acked: int) -> None:
    """An ``acked`` file with a valid checksum saying every id up to ``acked`` was delivered."""
    packed = struct.pack("<Q", acked)
    (directory / "acked").write_bytes(packed + struct.pack("<I", zlib.crc32(packed)))


def record_v1(entry_id: int, topic: bytes, data: bytes, qos: int = 1) -> bytes:
    """A record as edged wrote it before records carried their time (magic ``\\xedOB1``)."""
    body = struct.pack("<QBHI", entry_id, qos, len(topic), len(data)) + topic + data
    return b"\xedOB1" + struct.pack("<I", zlib.crc32(body)) + body



def test_append_peek_ack_in_order(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    ids = fill(outbox, 10)
    assert ids == sorted(ids) and len(set(ids)) == 10
    assert len(outbox) == 10
    head = outbox.peek(3)
    assert [e.payload for e in head] == [payload(0), payload(1), payload(2)]
    assert all(e.topic == TOPIC and e.qos == 1 for e in head)
    assert [e.id for e in outbox.peek(2, after=ids[2])] == ids[3:5]
    for entry_id in ids[:4]:
        outbox.ack(entry_id)
    outbox.ack(ids[0])  # a second ack of the same id is harmless
    assert len(outbox) == 6
    assert [e.payload for e in outbox.peek(100)] == [payload(i) for i in range(4, 10)]
    outbox.close()
    with pytest.raises(EdgedError, match="closed"):
        outbox.append(TOPIC, b"too late", 1)  # never writes to a descriptor reused meanwhile


def test_pending_messages_survive_reopen_and_acks_stick(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    ids = fill(outbox, 20)
    for entry_id in ids[:7]:
        outbox.ack(entry_id)
    outbox.close()

    reopened = Outbox(tmp_path)
    assert [e.payload for e in reopened.peek(100)] == [payload(i) for i in range(7, 20)]
    new_id = reopened.append(TOPIC, b"later", 0)
    assert new_id > ids[-1]  # ids keep increasing across restarts
    reopened.close()


def test_everything_acked_then_reopened_is_empty_and_ids_continue(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, segment_bytes=200)
    ids = fill(outbox, 30)
    for entry_id in ids:
        outbox.ack(entry_id)
    outbox.close()
    reopened = Outbox(tmp_path, segment_bytes=200)
    assert len(reopened) == 0 and reopened.peek(5) == []
    assert reopened.append(TOPIC, b"x", 1) == ids[-1] + 1
    reopened.close()


def test_full_outbox_drops_the_oldest_and_counts(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, max_messages=5)
    fill(outbox, 12)
    assert len(outbox) == 5
    assert outbox.dropped == 7
    assert [e.payload for e in outbox.peek(10)] == [payload(i) for i in range(7, 12)]
    outbox.close()
    # A smaller limit at the next start trims the oldest too.
    smaller = Outbox(tmp_path, max_messages=2)
    assert smaller.dropped == 3
    assert [e.payload for e in smaller.peek(10)] == [payload(10), payload(11)]
    smaller.close()


def test_segments_roll_over_and_delivered_ones_are_deleted(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, segment_bytes=300)
    ids = fill(outbox, 40)
    assert len(segments(tmp_path)) > 3
    for entry_id in ids[:-1]:
        outbox.ack(entry_id)
    assert len(segments(tmp_path)) == 1  # only the segment holding the last message is left
    assert [e.payload for e in outbox.peek(5)] == [payload(39)]
    outbox.close()


def test_crash_loses_nothing(tmp_path: Path) -> None:
    """A process killed right after its appends: every appended message is there."""
    script = (
        "import os, signal, sys\n"
        "from edged.outbox import Outbox\n"
        "box = Outbox(sys.argv[1], sync_interval=None)\n"
        "for i in range(500):\n"
        "    box.append('t', b'%d' % i, 1)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    outbox = Outbox(tmp_path)
    assert [e.payload for e in outbox.peek(1000)] == [b"%d" % i for i in range(500)]
    outbox.close()


def test_corrupt_entry_is_skipped_with_one_warning(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox(tmp_path)
    fill(outbox, 10)
    outbox.close()
    (segment,) = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    fifth = data.find(payload(4))
    data[fifth + 3] ^= 0xFF  # flip bits inside the 5th record's payload
    segment.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="edged.outbox"):
        reopened = Outbox(tmp_path)
    assert [e.payload for e in reopened.peek(100)] == [payload(i) for i in range(10) if i != 4]
    assert reopened.corrupt == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "corrupt entry" in warnings[0] and segment.name in warnings[0]
    assert "\n" not in warnings[0]
    reopened.close()


def test_damaged_record_header_resyncs_on_the_next_record(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    fill(outbox, 6)
    outbox.close()
    (segment,) = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    second = data.find(MAGIC, 1)
    data[second + 10: second + 14] = b"\xff\xff\xff\xff"  # garbage in the 2nd record's header
    segment.write_bytes(bytes(data))
    reopened = Outbox(tmp_path)
    assert [e.payload for e in reopened.peek(100)] == [payload(i) for i in (0, 2, 3, 4, 5)]
    reopened.close()


def test_torn_tail_is_cut_and_appending_goes_on(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox(tmp_path)
    fill(outbox, 3)
    outbox.close()
    (segment,) = segments(tmp_path)
    size = segment.stat().st_size
    with segment.open("ab") as f:
        f.write(MAGIC + b"\x01\x02\x03")  # a record cut short by a crash
    with caplog.at_level(logging.WARNING, logger="edged.outbox"):
        reopened = Outbox(tmp_path)
    assert segment.stat().st_size == size
    assert any("partly written" in r.getMessage() for r in caplog.records)
    fill(reopened, 2, start=3)
    reopened.close()
    again = Outbox(tmp_path)
    assert [e.payload for e in again.peek(100)] == [payload(i) for i in range(5)]
    again.close()


def test_damaged_cursor_resends_rather_than_loses(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    ids = fill(outbox, 5)
    outbox.ack(ids[0])
    outbox.close()
    (tmp_path / "acked").write_bytes(b"\x00" * 12 + b"junk")
    reopened = Outbox(tmp_path)
    assert [e.payload for e in reopened.peek(10)] == [payload(i) for i in range(5)]
    reopened.close()


def test_concurrent_producers_keep_every_message(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, segment_bytes=4096)

    def produce(worker: int) -> None:
        for i in range(200):
            outbox.append(f"edged/dev/s{worker}/result", payload(i), 1)

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entries = outbox.peek(10_000)
    assert len(entries) == 800
    assert [e.id for e in entries] == sorted(e.id for e in entries)
    for worker in range(4):
        mine = [e.payload for e in entries if e.topic == f"edged/dev/s{worker}/result"]
        assert mine == [payload(i) for i in range(200)]
    outbox.close()


def test_unusable_directory_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(EdgedError) as info:
        Outbox(blocker / "outbox")
    message = str(info.value)
    assert str(blocker / "outbox") in message and "\n" not in message
    with pytest.raises(EdgedError, match="max_messages"):
        Outbox(tmp_path / "ok", max_messages=0)



def test_peek_after_finds_the_right_records(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    ids = fill(outbox, 3000)
    outbox.ack(ids[10])  # out of order: a hole in the middle
    outbox.ack(ids[0])
    assert [e.id for e in outbox.peek(5, after=ids[7])] == [ids[8], ids[9], *ids[11:14]]
    assert [e.id for e in outbox.peek(3)] == ids[1:4]
    assert [e.id for e in outbox.peek(3, after=0)] == ids[1:4]
    assert [e.id for e in outbox.peek(100, after=ids[-4])] == ids[-3:]
    assert outbox.peek(5, after=ids[-1]) == []
    # After most are acknowledged (the id list is compacted meanwhile), it still lands right.
    for entry_id in ids[:2500]:
        outbox.ack(entry_id)
    assert [e.id for e in outbox.peek(2, after=ids[2600])] == ids[2601:2603]
    assert [e.payload for e in outbox.peek(2)] == [payload(2500), payload(2501)]
    outbox.close()
    reopened = Outbox(tmp_path)
    assert [e.id for e in reopened.peek(2, after=ids[2998])] == [ids[2999]]
    reopened.close()


def test_cursor_beyond_the_last_record_is_refused(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox(tmp_path)
    ids = fill(outbox, 6)
    outbox.ack(ids[0])
    outbox.ack(ids[1])
    outbox.close()
    write_cursor(tmp_path, 2**64 - 1)  # a valid checksum, an id no record ever had
    with caplog.at_level(logging.WARNING, logger="edged.outbox"):
        reopened = Outbox(tmp_path)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "beyond the last entry" in warnings[0], warnings
    # Nothing pending is lost: what the segment keeps is sent (again), in order.
    assert [e.payload for e in reopened.peek(100)] == [payload(i) for i in range(6)]
    assert reopened.append(TOPIC, b"later", 1) == ids[-1] + 1  # ids follow the records
    reopened.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edged.outbox"):
        again = Outbox(tmp_path)  # the refused cursor was replaced
    assert caplog.records == []
    assert [e.payload for e in again.peek(100)] == [payload(i) for i in range(6)] + [b"later"]
    again.close()


def test_byte_bound_drops_the_oldest_or_the_newest(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    probe = Outbox(tmp_path / "probe")
    probe.append(TOPIC, payload(0), 1)
    size = probe.nbytes  # one record of a one-digit payload
    probe.close()

    oldest = Outbox(tmp_path / "oldest", max_bytes=3 * size + size // 2)
    with caplog.at_level(logging.WARNING, logger="edged.outbox"):
        fill(oldest, 10)
    assert len(oldest) == 3 and oldest.nbytes == 3 * size and oldest.dropped == 7
    assert [e.payload for e in oldest.peek(10)] == [payload(i) for i in (7, 8, 9)]
    assert len(caplog.records) == 1 and "dropping the oldest" in caplog.records[0].getMessage()
    oldest.close()
    smaller = Outbox(tmp_path / "oldest", max_bytes=2 * size)  # a smaller bound at start
    assert [e.payload for e in smaller.peek(10)] == [payload(8), payload(9)]
    assert smaller.dropped == 1
    smaller.close()

    caplog.clear()
    newest = Outbox(tmp_path / "newest", max_bytes=3 * size + size // 2, full="drop_newest")
    with caplog.at_level(logging.WARNING, logger="edged.outbox"):
        stored = fill(newest, 10)
    assert stored[3:] == [None] * 7 and newest.dropped == 7
    assert [e.payload for e in newest.peek(10)] == [payload(i) for i in (0, 1, 2)]
    assert len(caplog.records) == 1 and "refusing new messages" in caplog.records[0].getMessage()
    newest.ack(stored[0])  # room again: the next one is taken
    assert newest.append(TOPIC, payload(3), 1) is not None
    newest.close()

    # A record larger than the whole byte bound is refused whatever the strategy.
    big = Outbox(tmp_path / "big", max_bytes=2 * size)
    big.append(TOPIC, payload(0), 1)
    assert big.append(TOPIC, b"x" * 3 * size, 1) is None
    assert big.dropped == 1 and [e.payload for e in big.peek(5)] == [payload(0)]
    big.close()


def test_count_bound_with_drop_newest_keeps_the_first(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, max_messages=4, full="drop_newest")
    stored = fill(outbox, 9)
    assert stored[4:] == [None] * 5 and outbox.dropped == 5
    assert [e.payload for e in outbox.peek(10)] == [payload(i) for i in range(4)]
    outbox.close()


def test_old_messages_expire(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = [1_800_000_000.0]
    outbox = Outbox(tmp_path, max_age=60, clock=lambda: now[0])
    fill(outbox, 3)
    now[0] += 50
    fill(outbox, 2, start=3)
    assert outbox.oldest_age() == 50
    now[0] += 20  # the first three are 70 s old
    with caplog.at_level(logging.WARNING, logger="edged.outbox"):
        assert [e.payload for e in outbox.peek(10)] == [payload(3), payload(4)]
        assert outbox.expired == 3 and outbox.oldest_age() == 20
        now[0] += 100
        outbox.maybe_sync()  # periodically, without anything peeked
    assert len(outbox) == 0 and outbox.expired == 5 and outbox.oldest_age() is None
    assert outbox.nbytes == 0 and outbox.dropped == 0
    assert len(caplog.records) == 1 and "older than 60 s" in caplog.records[0].getMessage()
    # The time is in the record: after a restart the age still counts from the append.
    fill(outbox, 2, start=5)
    outbox.close()
    later = Outbox(tmp_path, max_age=60, clock=lambda: now[0] + 30)
    assert later.oldest_age() == 30 and len(later.peek(10)) == 2
    later.close()
    expired = Outbox(tmp_path, max_age=60, clock=lambda: now[0] + 61)
    assert expired.peek(10) == [] and expired.expired == 2
    expired.close()
    without_age = Outbox(tmp_path)
    assert without_age.peek(10) == []  # expiry moved the cursor
    without_age.close()


def test_an_outbox_of_the_previous_format_is_still_read(tmp_path: Path) -> None:
    """An outbox written before records carried their time (``\\xedOB1``): read on upgrade,
    its records of unknown age never expire, and new records follow them in order."""
    (tmp_path / "0000000000000001.seg").write_bytes(
        b"".join(record_v1(i, TOPIC.encode(), payload(i)) for i in range(1, 6)))
    write_cursor(tmp_path, 2)  # the cursor file's format did not change
    far_future = time.time() + 10 * 365 * 86400
    outbox = Outbox(tmp_path, max_age=60, clock=lambda: far_future)
    entries = outbox.peek(10)
    assert [(e.id, e.payload, e.topic, e.qos) for e in entries] == [
        (i, payload(i), TOPIC, 1) for i in (3, 4, 5)]
    assert outbox.expired == 0 and outbox.corrupt == 0 and outbox.oldest_age() is None
    assert outbox.append(TOPIC, payload(6), 1) == 6  # new format, same segment
    outbox.ack(3)
    outbox.close()
    reopened = Outbox(tmp_path)
    assert [e.payload for e in reopened.peek(10)] == [payload(i) for i in (4, 5, 6)]
    assert reopened.corrupt == 0
    reopened.close()


def test_quarantine_keeps_the_record_or_drops_it(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox(tmp_path / "box")
    fill(outbox, 3)
    first, second, third = outbox.peek(3)
    with caplog.at_level(logging.WARNING, logger="edged.outbox"):
        outbox.quarantine(second, "Publish topic cannot contain wildcards.")
    assert [e.id for e in outbox.peek(3)] == [first.id, third.id] and outbox.quarantined == 1
    quarantined = (tmp_path / "box" / "quarantine").read_bytes()
    assert quarantined.startswith(MAGIC) and quarantined.endswith(payload(1))
    (message,) = [r.getMessage() for r in caplog.records]
    assert f"message {second.id} on '{TOPIC}'" in message and "wildcards" in message
    assert "moved to" in message
    # Best effort: when the quarantine file cannot be written the record is dropped anyway.
    (tmp_path / "box" / "quarantine").unlink()
    (tmp_path / "box" / "quarantine").mkdir()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edged.outbox"):
        outbox.quarantine(third, "bad")
    assert [e.id for e in outbox.peek(3)] == [first.id] and outbox.quarantined == 2
    assert "dropped (not kept" in caplog.records[0].getMessage()
    outbox.close()


def test_records_the_client_refuses_are_quarantined_and_the_rest_sent(
        mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Records with a valid checksum whose topic no client may publish to (as a damaged or
    foreign file may hold them) leave the queue; the ones behind them are delivered."""
    directory = tmp_path / "outbox"
    topic = "edged/quar/cam/result"
    crafted = Outbox(directory)
    bad = []
    for i in range(10):
        crafted.append(topic, payload(i), 1)
        if i in (2, 5):
            bad.append(crafted.append(f"edged/quar/{'#' if i == 2 else '+'}/result", b"{}", 1))
    bad.append(crafted.append("", b"{}", 1))  # an empty topic
    crafted.close()

    sub = Subscriber(mosquitto, topic)
    sink = MqttSink(mosquitto.config(), "quar", directory, reconnect_min=0.1, reconnect_max=0.5)
    with caplog.at_level(logging.WARNING):
        sink.start()
        try:
            sub.wait(lambda: len(sub.on(topic)) >= 10, 10)
            assert wait_until(lambda: sink.stats()["queued"] == 0, 5)
            stats = sink.stats()
        finally:
            sink.close(timeout=0.5)
    assert [json.loads(m.payload)["sequence"] for m in sub.on(topic)] == list(range(10))
    assert stats["quarantined"] == 3 and stats["sent"] == 10 and stats["dropped"] == 3
    warnings = [r.getMessage() for r in caplog.records if "refused by the client" in r.getMessage()]
    assert len(warnings) == 3, warnings
    for entry_id, bad_topic, warning in zip(
            bad, ["edged/quar/#/result", "edged/quar/+/result", ""], warnings, strict=True):
        assert f"message {entry_id} on {bad_topic!r}" in warning
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert (directory / "quarantine").read_bytes().count(b"\xedOB") == 3
    sub.close()


def test_sink_applies_the_outbox_bounds_and_reports_them(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    # Two results written an hour ago, one now: the sink's periodic expiry takes the two.
    crafted = Outbox(directory, clock=lambda: time.time() - 3600)
    fill(crafted, 2)
    crafted.close()
    fresh = Outbox(directory)
    fill(fresh, 1, start=2)
    fresh.close()
    away = MqttConfig(host="127.0.0.1", port=free_port(), outbox_max=10, outbox_max_mb=1,
                      outbox_max_age=60, outbox_full="drop_newest")
    sink = MqttSink(away, "bounds", directory, reconnect_min=0.1, reconnect_max=0.5)
    sink.start()
    try:
        assert wait_until(lambda: sink.stats()["expired"] == 2, 5)
        big = "x" * 600_000
        sink.publish("cam/result", {"sequence": 3, "pad": big})
        sink.publish("cam/result", {"sequence": 4, "pad": big})  # over 1 MB: refused
        sink.publish("cam/result", {"sequence": 5})
        stats = sink.stats()
    finally:
        sink.close(timeout=0.1)
    assert stats["queued"] == 3 and stats["expired"] == 2 and stats["quarantined"] == 0
    assert stats["dropped"] == 2 + 1
    assert 600_000 < stats["queued_bytes"] < 601_000 and 0 <= stats["oldest_age_s"] < 60
    kept = Outbox(directory)
    assert [json.loads(e.payload)["sequence"] for e in kept.peek(10)] == [2, 3, 5]
    kept.close()
