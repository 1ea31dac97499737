"""The on-disk outbox: order, acknowledgement, limits, restarts, crashes and damaged files."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edged.errors import EdgedError
from edged.outbox import MAGIC, Outbox

TOPIC = "edged/dev/cam/result"


def payload(i: int) -> bytes:
    return b'{"sequence":%d}' % i


def fill(outbox: Outbox, n: int, start: int = 0) -> list[int]:
    return [outbox.append(TOPIC, payload(i), 1) for i in range(start, start + n)]


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


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

