"""A bounded, ordered, crash-safe on-disk queue of messages waiting for the broker.

Layout: a directory of append-only segment files named after their first message id
(``0000000000000001.seg``) plus ``acked``, a 12-byte cursor saying that every id up to it has been
delivered. A record is ``MAGIC | crc32 | id | qos | topic length | payload length | topic |
payload``; the CRC covers everything after itself, so a damaged record is recognised, skipped
with one warning, and the reader finds the next record by its magic bytes.

Durability (chosen for SD cards, whose flash wears with every sync): a record is handed to the
kernel with one ``write`` before ``append`` returns, so a crash of the process loses nothing;
``fsync`` runs at most once per ``sync_interval`` seconds, so a power cut loses at most that much.
Acknowledged messages are dropped by moving the cursor (rewritten in place, no new file) and by
deleting a segment once none of its records is pending. Delivery is at least once: a message
acknowledged out of order just before a crash may be sent again.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

from edged.errors import EdgedError

log = logging.getLogger("edged.outbox")

MAGIC = b"\xedOB1"
_HEAD = struct.Struct("<IQBHI")  # crc32, id, qos, topic length, payload length
_HEAD_SIZE = len(MAGIC) + _HEAD.size
_CURSOR = struct.Struct("<QI")  # last acknowledged id, crc32 of that id
_SUFFIX = ".seg"


class Entry(NamedTuple):
    """One queued message."""

    id: int
    topic: str
    payload: bytes
    qos: int


class _Segment:
    """One segment file: its descriptor, size and how many of its records are still pending."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.live = 0


def _encode(entry_id: int, topic: bytes, payload: bytes, qos: int) -> bytes:
    body = struct.pack("<QBHI", entry_id, qos, len(topic), len(payload)) + topic + payload
    return MAGIC + struct.pack("<I", zlib.crc32(body)) + body


def _decode(data: bytes | memoryview, offset: int) -> tuple[Entry, int] | None:
    """The record at ``offset`` and its size, or None when the bytes there are not a valid one."""
    if data[offset:offset + len(MAGIC)] != MAGIC or offset + _HEAD_SIZE > len(data):
        return None
    crc, entry_id, qos, topic_len, payload_len = _HEAD.unpack_from(data, offset + len(MAGIC))
    end = offset + _HEAD_SIZE + topic_len + payload_len
    if end > len(data) or zlib.crc32(data[offset + len(MAGIC) + 4:end]) != crc or qos > 2:
        return None
    topic_start = offset + _HEAD_SIZE
    try:
        topic = bytes(data[topic_start:topic_start + topic_len]).decode()
    except UnicodeDecodeError:
        return None
    payload = bytes(data[topic_start + topic_len:end])
    return Entry(entry_id, topic, payload, qos), end - offset


class Outbox:
    """Messages kept on disk, in order, until ``ack``-ed; at most ``max_messages`` of them
    (appending to a full outbox drops the oldest and counts them in ``dropped``).

    Thread-safe: producers ``append`` while the sender ``peek``-s and ``ack``-s.
    """

    def __init__(self, directory: str | os.PathLike, max_messages: int = 10000,
                 segment_bytes: int = 4 << 20, sync_interval: float | None = 1.0) -> None:
        if max_messages < 1:
            raise EdgedError(f"outbox {directory}: max_messages must be >= 1, got {max_messages}")
        self.directory = Path(directory)
        self.max_messages = max_messages
        self.segment_bytes = segment_bytes
        self.sync_interval = sync_interval  # None: never fsync; 0: after every append
        self.dropped = 0  # oldest messages discarded because the outbox was full
        self.corrupt = 0  # damaged records skipped
        self._lock = threading.Lock()
        self._index: OrderedDict[int, tuple[_Segment, int, int]] = OrderedDict()
        self._segments: list[_Segment] = []
        self._current: _Segment | None = None
        self._dirty: set[_Segment] = set()  # segments written since the last sync
        self._dir_dirty = False  # a segment was created since the last sync
        self._cursor_dirty = False
        self._last_sync = time.monotonic()
        self._warned_full = False
        self._closed = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._cursor_fd = os.open(self.directory / "acked", os.O_RDWR | os.O_CREAT, 0o600)
            self._cursor = self._read_cursor()
            self._next_id = self._recover() + 1
        except OSError as exc:
            raise EdgedError(f"outbox {self.directory}: {exc.strerror or exc}") from None
        self._next_id = max(self._next_id, self._cursor + 1)
        self._trim()

    # -- recovery ---------------------------------------------------------------------------

    def _read_cursor(self) -> int:
        raw = os.pread(self._cursor_fd, _CURSOR.size, 0)
        if len(raw) < _CURSOR.size:
            return 0
        acked, crc = _CURSOR.unpack(raw)
        if zlib.crc32(raw[:8]) != crc:
            log.warning("outbox %s: damaged cursor file, resending everything kept",
                        self.directory)
            return 0
        return acked

    def _recover(self) -> int:
        """Index the pending records of every segment; returns the highest id seen."""
        highest = self._cursor
        paths = sorted(p for p in self.directory.iterdir() if p.suffix == _SUFFIX)
        for number, path in enumerate(paths):
            data = path.read_bytes()
            last = number == len(paths) - 1
            segment = _Segment(path, os.open(path, os.O_RDWR | os.O_APPEND), len(data))
            self._segments.append(segment)
            highest = max(highest, self._scan(segment, data, last))
        if self._segments:
            self._current = self._segments[-1]
        for segment in list(self._segments):
            if segment.live == 0 and segment is not self._current:
                self._remove(segment)
        return highest

    def _scan(self, segment: _Segment, data: bytes, last: bool) -> int:
        """Index one segment's pending records, skipping damaged bytes."""
        highest = 0
        offset = 0
        while offset < len(data):
            decoded = _decode(data, offset)
            if decoded is None:
                resume = self._resync(data, offset + 1)
                self.corrupt += 1
                if resume < 0 and last:
                    # A record cut short by a crash mid-write: cut it off so appends stay clean.
                    os.ftruncate(segment.fd, offset)
                    segment.size = offset
                    log.warning("outbox %s: dropped a partly written entry at byte %d",
                                segment.path, offset)
                    break
                log.warning("outbox %s: skipped a corrupt entry at byte %d", segment.path, offset)
                if resume < 0:
                    break
                offset = resume
                continue
            entry, size = decoded
            if entry.id > self._cursor:
                self._index[entry.id] = (segment, offset, size)
                segment.live += 1
            highest = max(highest, entry.id)
            offset += size
        return highest

    @staticmethod
    def _resync(data: bytes, start: int) -> int:
        """Offset of the next valid record at or after ``start``, or -1."""
        offset = data.find(MAGIC, start)
        while offset >= 0 and _decode(data, offset) is None:
            offset = data.find(MAGIC, offset + 1)
        return offset

    # -- queue ------------------------------------------------------------------------------

    def append(self, topic: str, payload: bytes, qos: int) -> int:
        """Store a message; returns its id. Raises EdgedError when the disk refuses it."""
        with self._lock:
            if self._closed:
                raise EdgedError(f"outbox {self.directory}: closed, message not stored")
            self._make_room()
            entry_id = self._next_id
            record = _encode(entry_id, topic.encode(), payload, qos)
            segment = self._segment_for_append()
            try:
                written = os.write(segment.fd, record)
                if written != len(record):
                    raise OSError(28, "short write (disk full?)")
            except OSError as exc:
                os.ftruncate(segment.fd, segment.size)  # keep the file free of a torn record
                raise EdgedError(
                    f"outbox {self.directory}: cannot store a message: {exc.strerror or exc}"
                ) from None
            self._index[entry_id] = (segment, segment.size, len(record))
            segment.size += len(record)
            segment.live += 1
            self._next_id += 1
            self._dirty.add(segment)
            if self.sync_interval == 0:
                self._sync()
            else:
                self._maybe_sync()
            return entry_id

    def peek(self, n: int, after: int | None = None) -> list[Entry]:
        """Up to ``n`` pending messages, oldest first, with ids greater than ``after``."""
        entries: list[Entry] = []
        with self._lock:
            if self._closed:
                return entries
            for entry_id, (segment, offset, size) in list(self._index.items()):
                if len(entries) >= n:
                    break
                if after is not None and entry_id <= after:
                    continue
                decoded = _decode(os.pread(segment.fd, size, offset), 0)
                if decoded is None or decoded[0].id != entry_id:
                    self.corrupt += 1
                    log.warning("outbox %s: skipped a corrupt entry at byte %d",
                                segment.path, offset)
                    self._forget(entry_id)
                    continue
                entries.append(decoded[0])
        return entries

    def ack(self, entry_id: int) -> None:
        """Forget a delivered message (unknown or already dropped ids are ignored)."""
        with self._lock:
            if not self._closed and entry_id in self._index:
                self._forget(entry_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def sync(self) -> None:
        """Force pending appends and the cursor to stable storage."""
        with self._lock:
            if not self._closed:
                self._sync()

    def maybe_sync(self) -> None:
        """``sync`` if the last one is older than ``sync_interval`` (call this periodically)."""
        with self._lock:
            if not self._closed:
                self._maybe_sync()

    def close(self) -> None:
        """Sync and close every file; the pending messages stay for the next start (``len``
        still counts them)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.sync_interval is not None:
                self._sync()
            for segment in self._segments:
                os.close(segment.fd)
            self._segments.clear()
            os.close(self._cursor_fd)

    # -- internals (lock held) ----------------------------------------------------------------

    def _make_room(self) -> None:
        if len(self._index) < self.max_messages:
            self._warned_full = False
            return
        if not self._warned_full:
            log.warning("outbox %s: full (%d messages), dropping the oldest",
                        self.directory, self.max_messages)
            self._warned_full = True
        self._trim(self.max_messages - 1)

    def _trim(self, keep: int | None = None) -> None:
        """Drop the oldest messages beyond ``keep`` (default ``max_messages``)."""
        keep = self.max_messages if keep is None else keep
        while len(self._index) > keep:
            self._forget(next(iter(self._index)))
            self.dropped += 1

    def _forget(self, entry_id: int) -> None:
        segment = self._index.pop(entry_id)[0]
        segment.live -= 1
        if segment.live == 0 and segment is not self._current:
            self._remove(segment)
        cursor = next(iter(self._index)) - 1 if self._index else self._next_id - 1
        if cursor != self._cursor:
            self._cursor = cursor
            packed = struct.pack("<Q", cursor)
            os.pwrite(self._cursor_fd, packed + struct.pack("<I", zlib.crc32(packed)), 0)
            self._cursor_dirty = True

    def _segment_for_append(self) -> _Segment:
        current = self._current
        if current is not None and current.size < self.segment_bytes:
            return current
        path = self.directory / f"{self._next_id:016d}{_SUFFIX}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise EdgedError(f"outbox {self.directory}: cannot create {path.name}: "
                             f"{exc.strerror or exc}") from None
        self._current = _Segment(path, fd, 0)
        self._segments.append(self._current)
        self._dir_dirty = True
        if current is not None and current.live == 0:
            self._remove(current)
        return self._current

    def _remove(self, segment: _Segment) -> None:
        os.close(segment.fd)
        self._segments.remove(segment)
        self._dirty.discard(segment)
        segment.path.unlink(missing_ok=True)

    def _maybe_sync(self) -> None:
        interval = self.sync_interval
        if interval is not None and time.monotonic() - self._last_sync >= interval:
            self._sync()

    def _sync(self) -> None:
        for segment in self._dirty:
            os.fsync(segment.fd)
        if self._dir_dirty:
            # A new segment's name must be durable too, not just its bytes.
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        if self._cursor_dirty:
            os.fsync(self._cursor_fd)
        self._dirty.clear()
        self._dir_dirty = self._cursor_dirty = False
        self._last_sync = time.monotonic()
