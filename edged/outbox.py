"""A bounded, ordered, crash-safe on-disk queue of messages waiting for the broker.

Layout: a directory of append-only segment files named after their first message id
(``0000000000000001.seg``), ``acked``, a 12-byte cursor saying that every id up to it has been
delivered, and ``quarantine``, the records the MQTT client refused. A record is ``MAGIC | crc32 |
id | time | qos | topic length | payload length | topic | payload``; the CRC covers everything
after itself, so a damaged record is recognised, skipped with one warning, and the reader finds
the next record by its magic bytes. Records of the previous format (``MAGIC_V1``, without the
time) are still read; their age is unknown, so they never expire.

Bounds: at most ``max_messages`` records and ``max_bytes`` bytes of records; appending beyond
either drops the oldest or refuses the new record (``full``). Records older than ``max_age``
seconds are dropped when they reach the head of the queue.

Durability (chosen for SD cards, whose flash wears with every sync): a record is handed to the
kernel with one ``write`` before ``append`` returns, so a crash of the process loses nothing;
``fsync`` runs at most once per ``sync_interval`` seconds, so a power cut loses at most that much.
Acknowledged messages are dropped by moving the cursor (rewritten in place in a file given its
block at open, so an acknowledgement never needs a new one) and by deleting a segment once none
of its records is pending. Delivery is at least once: a message acknowledged out of order just
before a crash may be sent again.

A full or failing disk never stops delivery: the in-memory index is the truth while running, a
cursor write or a sync that fails is retried at the next sync (one warning per failing stretch),
and only ``append`` reports the disk refusing a new record.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import threading
import time
import zlib
from bisect import bisect_right
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

from edged.errors import EdgedError

log = logging.getLogger("edged.outbox")

MAGIC = b"\xedOB2"
MAGIC_V1 = b"\xedOB1"  # written by edged before records carried their time
_HEAD = struct.Struct("<IQdBHI")  # crc32, id, time (Unix s), qos, topic length, payload length
_HEAD_V1 = struct.Struct("<IQBHI")  # crc32, id, qos, topic length, payload length
_CURSOR = struct.Struct("<QI")  # last acknowledged id, crc32 of that id
_SUFFIX = ".seg"
QUARANTINE = "quarantine"
QUARANTINE_BYTES = 16 << 20  # beyond this the quarantine file takes no more records

Full = Literal["drop_oldest", "drop_newest"]


class Entry(NamedTuple):
    """One queued message."""

    id: int
    topic: str
    payload: bytes
    qos: int
    stored: float | None = None  # when it was stored (Unix seconds); None: an older format


class _Segment:
    """One segment file: its descriptor, size and how many of its records are still pending."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.live = 0


def _encode(entry_id: int, stamp: float, topic: bytes, payload: bytes, qos: int) -> bytes:
    body = struct.pack("<QdBHI", entry_id, stamp, qos, len(topic), len(payload)) + topic + payload
    return MAGIC + struct.pack("<I", zlib.crc32(body)) + body


def _decode(data: bytes | memoryview, offset: int) -> tuple[Entry, float | None, int] | None:
    """The record at ``offset``, its time (None in the previous format) and its size, or None
    when the bytes there are not a valid record."""
    magic = data[offset:offset + len(MAGIC)]
    if magic == MAGIC:
        head = _HEAD
    elif magic == MAGIC_V1:
        head = _HEAD_V1
    else:
        return None
    start = offset + len(MAGIC)
    if start + head.size > len(data):
        return None
    if head is _HEAD:
        crc, entry_id, stamp, qos, topic_len, payload_len = head.unpack_from(data, start)
    else:
        crc, entry_id, qos, topic_len, payload_len = head.unpack_from(data, start)
        stamp = None
    topic_start = start + head.size
    end = topic_start + topic_len + payload_len
    if end > len(data) or zlib.crc32(data[start + 4:end]) != crc or qos > 2:
        return None
    try:
        topic = bytes(data[topic_start:topic_start + topic_len]).decode()
    except UnicodeDecodeError:
        return None
    payload = bytes(data[topic_start + topic_len:end])
    return Entry(entry_id, topic, payload, qos, stamp), stamp, end - offset


class Outbox:
    """Messages kept on disk, in order, until ``ack``-ed.

    Bounds: at most ``max_messages`` messages and ``max_bytes`` bytes of records (None: no byte
    bound); when appending would exceed either, ``full="drop_oldest"`` drops the oldest to make
    room and ``"drop_newest"`` refuses the new message, both counted in ``dropped``. Messages
    older than ``max_age`` seconds by ``clock`` (None: no age bound) are dropped when they reach
    the head of the queue (``peek``, ``maybe_sync``) and counted in ``expired``.

    Thread-safe: producers ``append`` while the sender ``peek``-s and ``ack``-s.
    """

    def __init__(self, directory: str | os.PathLike, max_messages: int = 10000, *,
                 max_bytes: int | None = None, max_age: float | None = None,
                 full: Full = "drop_oldest", segment_bytes: int = 4 << 20,
                 sync_interval: float | None = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        if max_messages < 1:
            raise EdgedError(f"outbox {directory}: max_messages must be >= 1, got {max_messages}")
        if max_bytes is not None and max_bytes < 1:
            raise EdgedError(f"outbox {directory}: max_bytes must be >= 1, got {max_bytes}")
        if max_age is not None and max_age <= 0:
            raise EdgedError(f"outbox {directory}: max_age must be > 0, got {max_age}")
        if full not in ("drop_oldest", "drop_newest"):
            raise EdgedError(f"outbox {directory}: full must be drop_oldest or drop_newest, "
                             f"got {full!r}")
        self.directory = Path(directory)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.full = full
        self.segment_bytes = segment_bytes
        self.sync_interval = sync_interval  # None: never fsync; 0: after every append
        self.dropped = 0  # messages discarded or refused because a bound was reached
        self.expired = 0  # messages discarded for being older than max_age
        self.corrupt = 0  # damaged records skipped
        self.quarantined = 0  # messages the client refused, taken out of the queue
        self._clock = clock
        self._lock = threading.Lock()
        # id -> (segment, offset, size, time or None); ids in ascending order in _ids, which
        # also keeps removed ids until it is compacted (see _remove_entry).
        self._index: dict[int, tuple[_Segment, int, int, float | None]] = {}
        self._ids: list[int] = []
        self._head = 0  # every id before this position in _ids is removed
        self._bytes = 0  # size of the pending records
        self._segments: list[_Segment] = []
        self._current: _Segment | None = None
        self._dirty: set[_Segment] = set()  # segments written since the last sync
        self._dir_dirty = False  # a segment was created since the last sync
        self._cursor = 0
        self._cursor_stored = False  # the cursor file holds self._cursor
        self._cursor_dirty = False  # the cursor file was written since the last sync
        self._failing: set[str] = set()  # operations failing since their warning
        self._last_sync = time.monotonic()
        self._warned_full = False
        self._warned_expired = False
        self._closed = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._cursor_fd = os.open(self.directory / "acked", os.O_RDWR | os.O_CREAT, 0o600)
            stored = self._read_cursor()
            highest = self._recover()
            self._next_id = highest + 1
            self._settle(stored, highest)
            self._trim()
            self._move_cursor()
            self._preallocate_cursor()
        except OSError as exc:
            raise EdgedError(f"outbox {self.directory}: {exc.strerror or exc}") from None

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
        self._cursor_stored = True
        return acked

    def _recover(self) -> int:
        """Index every valid record of every segment; returns the highest id used: seen, or
        implied by a segment's name (the first id it was made for, even if it is empty)."""
        highest = 0
        paths = sorted(p for p in self.directory.iterdir() if p.suffix == _SUFFIX)
        for number, path in enumerate(paths):
            data = path.read_bytes()
            last = number == len(paths) - 1
            segment = _Segment(path, os.open(path, os.O_RDWR | os.O_APPEND), len(data))
            self._segments.append(segment)
            highest = max(highest, self._scan(segment, data, last))
            if path.stem.isdigit():
                # New ids must sort after every segment, or a restart would read them out of
                # order; the cursor is not trusted for this (a damaged one could be anything).
                highest = max(highest, int(path.stem) - 1)
        if self._segments:
            self._current = self._segments[-1]
        return highest

    def _scan(self, segment: _Segment, data: bytes, last: bool) -> int:
        """Index one segment's records, skipping damaged bytes; returns the highest id seen."""
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
            entry, stamp, size = decoded
            if self._ids and entry.id <= self._ids[-1]:
                # Ids only grow: a repeated or older one is a damaged (or copied-in) file.
                self.corrupt += 1
                log.warning("outbox %s: skipped an entry out of order at byte %d",
                            segment.path, offset)
            else:
                self._add(entry.id, segment, offset, size, stamp)
            highest = max(highest, entry.id)
            offset += size
        return highest

    @staticmethod
    def _resync(data: bytes, start: int) -> int:
        """Offset of the next valid record at or after ``start``, or -1."""
        offset = data.find(MAGIC[:3], start)  # the prefix both formats share
        while offset >= 0 and _decode(data, offset) is None:
            offset = data.find(MAGIC[:3], offset + 1)
        return offset

    def _settle(self, stored: int, highest: int) -> None:
        """Forget the records the stored cursor says were delivered, unless it points past every
        record on disk: such a cursor is damaged, and resending beats losing them unseen."""
        if self._index and stored > highest:
            log.warning("outbox %s: the cursor (%d) is beyond the last entry on disk (%d): "
                        "damaged, resending everything kept", self.directory, stored, highest)
            stored = 0
            self._cursor_stored = False
        self._cursor = stored
        while (first := self._first()) is not None and first <= stored:
            self._remove_entry(first)
        for segment in list(self._segments):
            if segment.live == 0 and segment is not self._current:
                self._remove(segment)

    def _preallocate_cursor(self) -> None:
        """Write the cursor file at its full size and give it its block now: rewriting it in
        place then never needs a new one, which a full disk would refuse."""
        if not self._cursor_stored:
            self._write_cursor()
        if hasattr(os, "posix_fallocate"):
            # A write that worked has reserved the block already; one that failed has warned.
            with contextlib.suppress(OSError):
                os.posix_fallocate(self._cursor_fd, 0, _CURSOR.size)

    # -- queue ------------------------------------------------------------------------------

    def append(self, topic: str, payload: bytes, qos: int) -> int | None:
        """Store a message; returns its id, or None when the outbox is full and refuses new
        messages (``full="drop_newest"``; counted in ``dropped``). Raises EdgedError when the
        disk refuses it."""
        with self._lock:
            if self._closed:
                raise EdgedError(f"outbox {self.directory}: closed, message not stored")
            entry_id, stamp = self._next_id, self._clock()
            record = _encode(entry_id, stamp, topic.encode(), payload, qos)
            if not self._make_room(len(record)):
                return None
            segment = self._segment_for_append()
            try:
                try:
                    self._write(segment, record)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC or segment.live or not segment.size:
                        raise
                    # Every record of this segment was delivered, but its file fills a disk
                    # smaller than a segment: starting a fresh segment deletes it.
                    segment = self._segment_for_append(fresh=True)
                    self._write(segment, record)
            except OSError as exc:
                raise EdgedError(
                    f"outbox {self.directory}: cannot store a message: {exc.strerror or exc}"
                ) from None
            self._add(entry_id, segment, segment.size, len(record), stamp)
            segment.size += len(record)
            self._next_id += 1
            self._dirty.add(segment)
            if self.sync_interval == 0:
                self._sync()
            else:
                self._maybe_sync()
            return entry_id

    def peek(self, n: int, after: int | None = None) -> list[Entry]:
        """Up to ``n`` pending messages, oldest first, with ids greater than ``after`` (found by
        bisection: the cost does not grow with the queue). Expired messages are dropped first."""
        entries: list[Entry] = []
        with self._lock:
            if self._closed:
                return entries
            self._expire()
            ids = self._ids
            position = self._head if after is None else bisect_right(ids, after, self._head)
            damaged: list[int] = []
            while len(entries) < n and position < len(ids):
                entry_id = ids[position]
                position += 1
                where = self._index.get(entry_id)
                if where is None:
                    continue  # removed, not yet compacted away
                segment, offset, size, _ = where
                try:
                    decoded = _decode(os.pread(segment.fd, size, offset), 0)
                except OSError:
                    decoded = None
                if decoded is None or decoded[0].id != entry_id:
                    self.corrupt += 1
                    log.warning("outbox %s: skipped a corrupt entry at byte %d",
                                segment.path, offset)
                    damaged.append(entry_id)
                    continue
                entries.append(decoded[0])
            for entry_id in damaged:  # not while iterating: removing may compact _ids
                self._remove_entry(entry_id)
            if damaged:
                self._move_cursor()
        return entries

    def ack(self, entry_id: int) -> None:
        """Forget a delivered message (unknown or already dropped ids are ignored)."""
        with self._lock:
            if not self._closed and entry_id in self._index:
                self._remove_entry(entry_id)
                self._move_cursor()
                self._warned_expired = False  # delivering again: a later expiry is news

    def quarantine(self, entry: Entry, reason: str) -> None:
        """Take a message the client refuses out of the queue for good: its record is appended
        to the ``quarantine`` file (best effort, up to QUARANTINE_BYTES, else it is dropped),
        counted in ``quarantined`` and named in one warning."""
        with self._lock:
            where = self._index.get(entry.id)
            if self._closed or where is None:
                return
            segment, offset, size, _ = where
            path = self.directory / QUARANTINE
            try:
                record = os.pread(segment.fd, size, offset)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    kept = os.fstat(fd).st_size
                    if kept + len(record) > QUARANTINE_BYTES:
                        raise OSError(errno.EFBIG, f"it holds {kept} bytes already")
                    if os.write(fd, record) != len(record):
                        os.ftruncate(fd, kept)
                        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (short write)")
                finally:
                    os.close(fd)
                fate = f"moved to {path}"
            except OSError as exc:
                fate = f"dropped (not kept in {path}: {exc.strerror or exc})"
            self._remove_entry(entry.id)
            self._move_cursor()
            self.quarantined += 1
            log.warning("outbox %s: message %d on %r refused by the client (%s): %s",
                        self.directory, entry.id, entry.topic, reason, fate)

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    @property
    def nbytes(self) -> int:
        """Bytes of the pending records."""
        return self._bytes

    def oldest_age(self) -> float | None:
        """Seconds the oldest pending message has waited; None when there is none or its time
        is unknown (a record of the previous format)."""
        with self._lock:
            first = self._first()
            stamp = None if first is None else self._index[first][3]
            return None if stamp is None else max(0.0, self._clock() - stamp)

    def sync(self) -> None:
        """Force pending appends and the cursor to stable storage (failures are retried at the
        next sync, with one warning per failing stretch)."""
        with self._lock:
            if not self._closed:
                self._sync()

    def maybe_sync(self) -> None:
        """Drop expired messages, and ``sync`` if the last one is older than ``sync_interval``
        (call this periodically)."""
        with self._lock:
            if not self._closed:
                self._expire()
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
            elif not self._cursor_stored:
                self._write_cursor()
            for segment in self._segments:
                os.close(segment.fd)
            self._segments.clear()
            os.close(self._cursor_fd)

    # -- internals (lock held) ----------------------------------------------------------------

    def _add(self, entry_id: int, segment: _Segment, offset: int, size: int,
             stamp: float | None) -> None:
        self._index[entry_id] = (segment, offset, size, stamp)
        self._ids.append(entry_id)
        self._bytes += size
        segment.live += 1

    def _remove_entry(self, entry_id: int) -> None:
        segment, _, size, _ = self._index.pop(entry_id)
        self._bytes -= size
        segment.live -= 1
        if segment.live == 0 and segment is not self._current:
            self._remove(segment)
        if len(self._ids) > 2 * len(self._index) + 1024:
            # Removed ids stay in _ids (deleting from a list's front is O(n)) until they are
            # the majority: compacting then costs O(1) per removal, amortised.
            self._ids = [i for i in self._ids[self._head:] if i in self._index]
            self._head = 0

    def _first(self) -> int | None:
        """The oldest pending id (moving ``_head`` past removed ones for good)."""
        ids = self._ids
        while self._head < len(ids) and ids[self._head] not in self._index:
            self._head += 1
        return ids[self._head] if self._head < len(ids) else None

    def _over(self, count: int, size: int) -> bool:
        """Whether ``count`` more messages of ``size`` bytes in all would break a bound."""
        return (len(self._index) + count > self.max_messages
                or (self.max_bytes is not None and self._bytes + size > self.max_bytes))

    def _make_room(self, size: int) -> bool:
        """Whether a record of ``size`` bytes may be stored, after dropping the oldest
        messages when ``full`` says so."""
        if not self._over(1, size):
            self._warned_full = False
            return True
        refuse = self.full == "drop_newest" or (self.max_bytes is not None
                                                and size > self.max_bytes)
        if not self._warned_full:
            log.warning("outbox %s: full (%d messages, %d bytes), %s", self.directory,
                        len(self._index), self._bytes,
                        "refusing new messages" if refuse else "dropping the oldest")
            self._warned_full = True
        if refuse:
            self.dropped += 1
            return False
        while self._over(1, size) and (first := self._first()) is not None:
            self._remove_entry(first)
            self.dropped += 1
        self._move_cursor()
        return True

    def _trim(self) -> None:
        """Drop the oldest messages beyond the bounds (smaller ones than at the last start)."""
        while self._over(0, 0) and (first := self._first()) is not None:
            self._remove_entry(first)
            self.dropped += 1

    def _expire(self) -> None:
        """Drop the messages at the head of the queue that are older than ``max_age``."""
        if self.max_age is None:
            return
        limit = self._clock() - self.max_age
        expired = 0
        while (first := self._first()) is not None:
            stamp = self._index[first][3]
            if stamp is None or stamp >= limit:
                break
            self._remove_entry(first)
            expired += 1
        if expired:
            self.expired += expired
            if not self._warned_expired:
                log.warning("outbox %s: dropping messages older than %g s (waiting for the "
                            "broker too long)", self.directory, self.max_age)
                self._warned_expired = True
            self._move_cursor()

    def _move_cursor(self) -> None:
        """Point the cursor just before the oldest pending message; while writing it fails it
        is kept in memory and retried at each sync."""
        first = self._first()
        cursor = first - 1 if first is not None else self._next_id - 1
        if cursor != self._cursor:
            self._cursor = cursor
            self._cursor_stored = False
            if "write the cursor" not in self._failing:
                self._write_cursor()

    def _write_cursor(self) -> None:
        packed = struct.pack("<Q", self._cursor)
        try:
            os.pwrite(self._cursor_fd, _CURSOR.pack(self._cursor, zlib.crc32(packed)), 0)
        except OSError as exc:
            self._failed("write the cursor", exc, "acknowledgements are kept in memory")
            return
        self._cursor_stored = self._cursor_dirty = True
        self._recovered("write the cursor")

    def _failed(self, what: str, exc: OSError, meanwhile: str) -> None:
        """Warn at the first failure of ``what`` in a stretch (its next success ends it)."""
        if what not in self._failing:
            self._failing.add(what)
            log.warning("outbox %s: cannot %s: %s (%s; retried at each sync)", self.directory,
                        what, exc.strerror or exc, meanwhile)

    def _recovered(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            log.info("outbox %s: can %s again", self.directory, what)

    @staticmethod
    def _write(segment: _Segment, record: bytes) -> None:
        """Append ``record`` to ``segment`` whole or not at all."""
        try:
            if os.write(segment.fd, record) != len(record):
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (short write)")
        except OSError:
            os.ftruncate(segment.fd, segment.size)  # keep the file free of a torn record
            raise

    def _segment_for_append(self, fresh: bool = False) -> _Segment:
        current = self._current
        if current is not None and current.size < self.segment_bytes and not fresh:
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
        self._last_sync = time.monotonic()
        if not self._cursor_stored:
            self._write_cursor()
        try:
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
        except OSError as exc:
            self._failed("sync to storage", exc, "what was written stays with the kernel")
            return
        self._dirty.clear()
        self._dir_dirty = self._cursor_dirty = False
        self._recovered("sync to storage")
