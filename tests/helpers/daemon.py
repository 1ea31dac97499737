"""Run the real daemon (``python -m edged ...``) as a child process, and a socket that plays
systemd's notify socket, for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from helpers import wait_notified


def write_config(directory: Path, data: dict[str, Any], name: str = "edged.yaml") -> Path:
    """Write a deployment YAML into ``directory``; returns its path."""
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Daemon:
    """``python -m edged <args>`` with its stdout and stderr lines collected as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> None:
        """``prefix`` runs the daemon through another command that execs it (e.g.
        ``ip netns exec NS``), so that the process is still the daemon's."""
        self.args = args
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen([*(prefix or []), sys.executable, "-m", "edged", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=full_env)
        for stream, lines in ((self.process.stdout, self.stdout),
                              (self.process.stderr, self.stderr)):
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True).start()

    def _collect(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._cond:
                lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds (re-checked on each output line, or every 0.1 s)."""
        return wait_notified(self._cond, predicate, timeout)

    def wait_log(self, pattern: str, timeout: float = 30.0) -> bool:
        """Wait for a stderr line matching the regular expression ``pattern``."""
        regex = re.compile(pattern)
        return self.wait_for(lambda: any(regex.search(line) for line in self.stderr), timeout)

    def send(self, sig: int) -> None:
        """Send a signal to the daemon."""
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the exit; returns the status."""
        return self.process.wait(timeout)

    def log(self) -> str:
        """Everything the daemon wrote to stderr so far (for assertion messages)."""
        with self._cond:
            return "\n".join(self.stderr[-60:])

    def close(self) -> None:
        """Stop it if still running (SIGTERM, then SIGKILL)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class NotifySocket:
    """A datagram socket bound where ``NOTIFY_SOCKET`` points; records each message's fields
    with the monotonic time it arrived."""

    def __init__(self, path: Path | None = None, abstract: bool = False) -> None:
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._cond = threading.Condition()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"edged-test-{os.getpid()}-{id(self)}"
            self._socket.bind("\0" + name)
            self.address = "@" + name
        else:
            assert path is not None
            self._socket.bind(str(path))
            self.address = str(path)
        self._socket.settimeout(0.2)
        self._closed = False
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self._socket.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.messages.append((time.monotonic(), fields))
                self._cond.notify_all()

    def times(self, key: str, value: str | None = None) -> list[float]:
        """When messages holding ``key`` (with ``value``, if given) arrived."""
        with self._cond:
            return [t for t, f in self.messages
                    if key in f and (value is None or f[key] == value)]

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30.0,
                 after: float = 0.0) -> bool:
        """Wait for a message holding ``key`` (=``value``) that arrived after ``after``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not [t for t in self.times(key, value) if t > after]:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.1))
            return True

    def close(self) -> None:
        """Stop receiving and close the socket."""
        self._closed = True
        self._socket.close()
