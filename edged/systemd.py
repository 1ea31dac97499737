"""systemd integration without libsystemd: ``sd_notify`` datagrams and the watchdog interval.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a path, or an abstract socket name when it
starts with ``@``) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends ``sd_notify`` messages; does nothing when not started by systemd."""

    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # A leading '@' names a socket in the abstract namespace (a leading NUL byte).
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = _watchdog_seconds(env)
        self._socket: socket.socket | None = None
        if self.address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        """True when a notification socket was given."""
        return self._socket is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines, e.g. ``notify(READY=1, STATUS="running")``.

        Returns False (and logs once per failure at debug level) when the message could not be
        sent: a missing manager must never stop the daemon.
        """
        if self._socket is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._socket.sendto(message, self.address)
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """The watchdog timeout in seconds, or None when the watchdog is off or meant for another
    process (``WATCHDOG_PID`` names a different pid)."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1e6


def under_systemd(environ: dict[str, str] | None = None) -> bool:
    """True when stderr goes to the journal (systemd sets ``JOURNAL_STREAM``) or the unit uses
    ``Type=notify``: then log lines need no timestamps (the journal adds its own)."""
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("NOTIFY_SOCKET"))


# syslog priorities of Python's levels: what ``journalctl -p`` filters on.
_PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
               logging.DEBUG: 7}


class _JournalFormatter(logging.Formatter):
    """Prefixes each line with ``<N>``, its syslog priority, which the journal reads from a
    service's stderr (``SyslogLevelPrefix=``, on by default)."""

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in sorted(_PRIORITIES.items(), reverse=True)
                         if record.levelno >= level), 7)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """Whether stderr is connected to the journal: ``JOURNAL_STREAM`` (``device:inode``) names
    the stream systemd set up, and stderr is still that stream (not redirected since)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        info = os.fstat(2)
    except OSError:
        return False
    return device.isdigit() and inode.isdigit() and (info.st_dev, info.st_ino) == (
        int(device), int(inode))


def journal_formatter(fmt: str) -> logging.Formatter | None:
    """A formatter with journal priority prefixes when stderr is the journal, else None."""
    return _JournalFormatter(fmt) if stderr_is_journal() else None
