"""A real mosquitto broker on 127.0.0.1 for tests, and a subscriber that records what it gets.

One broker process serves three listeners (``per_listener_settings true``): anonymous plain
(``port``), user + password (``auth_port``) and TLS + user + password (``tls_port``, a throwaway
CA and server certificate made with openssl). ``stop()`` / ``start()`` restart it on the same
ports; persistence is on, so a subscriber's session (``clean_session=False``) and its queued
QoS 1 messages survive the restart.

Fixtures (import the ``*_fixture`` names into a test module, then ask for them by name):
``mosquitto`` (one per session: never stop it) and ``private_mosquitto`` (one per test: stop and
restart it at will)::

    from helpers.broker import (  # noqa: F401
        mosquitto_fixture, mqtt_certs_fixture, private_mosquitto_fixture)
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edged.config import MqttConfig, TLSConfig
from helpers import wait_notified

USERNAME = "edged"
PASSWORD = "s3cret-test-pw"
READY_TIMEOUT = 10.0
CLIENT_CN = "edged-device"  # the client certificate's name: its user name on the mTLS listener


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class Certs:
    """A test CA, a server certificate for 127.0.0.1 / localhost, and a client certificate
    (CN ``edged-device``) for mutual TLS."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path


def make_certs(directory: Path) -> Certs:
    """Create the CA, the server and the client certificate (EC P-256, two days) with
    openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _run("openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=edged test CA", cwd=directory)
    _run("openssl", "req", *ec, "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=localhost", cwd=directory)
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.cnf",
         cwd=directory)
    _run("openssl", "req", *ec, "-keyout", "client.key", "-out", "client.csr",
         "-subj", f"/CN={CLIENT_CN}", cwd=directory)
    _run("openssl", "x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "client.crt", "-days", "2", cwd=directory)
    return Certs(directory / "ca.crt", directory / "server.crt", directory / "server.key",
                 directory / "client.crt", directory / "client.key")


class Mosquitto:
    """One mosquitto process with a plain, a password, a TLS + password and a mutual-TLS
    (client certificate, no password) listener."""

    host = "127.0.0.1"
    username = USERNAME
    password = PASSWORD

    def __init__(self, workdir: Path, certs: Certs) -> None:
        assert shutil.which("mosquitto"), "mosquitto is not installed (apt-get install mosquitto)"
        self.workdir = workdir
        self.certs = certs
        self.ca_file = certs.ca_file
        self.port, self.auth_port, self.tls_port = free_port(), free_port(), free_port()
        self.mtls_port = free_port()
        self.process: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        password_file = workdir / "passwd"
        password_file.touch(mode=0o600)
        _run("mosquitto_passwd", "-b", str(password_file), USERNAME, PASSWORD, cwd=workdir)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"""\
per_listener_settings true
user {pwd.getpwuid(os.getuid()).pw_name}
persistence true
persistence_location {workdir}/
log_dest file {workdir}/mosquitto.log
log_type error
log_type warning
log_type notice

listener {self.port} 127.0.0.1
allow_anonymous true

listener {self.auth_port} 127.0.0.1
allow_anonymous false
password_file {password_file}

listener {self.tls_port} 127.0.0.1
allow_anonymous false
password_file {password_file}
cafile {certs.ca_file}
certfile {certs.cert_file}
keyfile {certs.key_file}

listener {self.mtls_port} 127.0.0.1
allow_anonymous false
require_certificate true
use_identity_as_username true
cafile {certs.ca_file}
certfile {certs.cert_file}
keyfile {certs.key_file}
""")

    def start(self) -> None:
        """Start the broker and wait until every listener accepts connections."""
        assert self.process is None, "already running"
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + READY_TIMEOUT
        for port in (self.port, self.auth_port, self.tls_port, self.mtls_port):
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.process.stderr.read().decode()}"
                                       f"{self._log_tail()}")
                try:
                    socket.create_connection((self.host, port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"mosquitto not listening on {port}") from None
                    time.sleep(0.02)

    def stop(self) -> None:
        """Stop the broker gracefully (it saves its persistent state)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)
            self.process.stderr.close()
            self.process = None

    def kill(self) -> None:
        """Kill the broker (SIGKILL): no clean shutdown, no state saved."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process.stderr.close()
            self.process = None

    def restart(self) -> None:
        """Stop and start again on the same ports."""
        self.stop()
        self.start()

    def _log_tail(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text()[-2000:] if path.exists() else ""

    def config(self, listener: str = "plain", **overrides: Any) -> MqttConfig:
        """An ``MqttConfig`` for one listener: "plain", "auth", "tls" or "mtls"."""
        fields: dict[str, Any] = {"host": self.host, "port": self.port, "keepalive": 5}
        if listener in ("auth", "tls"):
            fields.update(port=self.auth_port, username=USERNAME, password=PASSWORD)
        if listener == "tls":
            fields.update(port=self.tls_port, tls=TLSConfig(ca_file=str(self.ca_file)))
        if listener == "mtls":
            fields.update(port=self.mtls_port, tls=TLSConfig(
                ca_file=str(self.ca_file), cert_file=str(self.certs.client_cert_file),
                key_file=str(self.certs.client_key_file)))
        fields.update(overrides)
        return MqttConfig(**fields)


class Subscriber:
    """A real paho client that records every message on ``topics`` (QoS 1).

    ``persistent=True`` keeps the session (and queued messages) across broker restarts."""

    def __init__(self, broker: Mosquitto, *topics: str, persistent: bool = False) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._topics = topics
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"test-sub-{uuid.uuid4().hex[:8]}",
                                  clean_session=not persistent)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect(broker.host, broker.port, keepalive=5)
        self.client.loop_start()
        assert self._subscribed.wait(READY_TIMEOUT), "test subscriber did not subscribe"

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        client.subscribe([(topic, 1) for topic in self._topics])

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def on(self, topic: str) -> list[mqtt.MQTTMessage]:
        """Messages received on exactly ``topic`` so far."""
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def json(self, topic: str) -> list[Any]:
        """Decoded JSON payloads received on ``topic``."""
        return [json.loads(m.payload) for m in self.on(topic)]

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate()`` is true (checked after each message); returns it."""
        return wait_notified(self._cond, predicate, timeout)

    def wait_count(self, topic: str, n: int, timeout: float = 10.0) -> list[mqtt.MQTTMessage]:
        """Wait for at least ``n`` messages on ``topic``; returns them (fewer on timeout)."""
        self.wait(lambda: len([m for m in self.messages if m.topic == topic]) >= n, timeout)
        return self.on(topic)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="session", name="mqtt_certs")
def mqtt_certs_fixture(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A throwaway CA and server certificate."""
    return make_certs(tmp_path_factory.mktemp("mqtt-certs"))


@pytest.fixture(scope="session", name="mosquitto")
def mosquitto_fixture(tmp_path_factory: pytest.TempPathFactory,
                      mqtt_certs: Certs) -> Iterator[Mosquitto]:
    """The session's shared broker (do not stop it: use ``private_mosquitto`` for that)."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"), mqtt_certs)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(name="private_mosquitto")
def private_mosquitto_fixture(tmp_path: Path, mqtt_certs: Certs) -> Iterator[Mosquitto]:
    """A broker of this test's own, free to be stopped and restarted."""
    broker = Mosquitto(tmp_path / "mosquitto", mqtt_certs)
    broker.start()
    yield broker
    broker.stop()
