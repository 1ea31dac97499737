"""A real Home Assistant (2024.3.3), headless, on 127.0.0.1, wired to the test broker.

edged's Home Assistant MQTT discovery messages are checked against the real thing, not a mock:

* ``ha_python()``: a dedicated virtualenv with Home Assistant and every requirement of the
  integrations it loads here, pinned, built once and cached under ``$EDGED_SYSTEM_CACHE``
  (default /var/cache/edged-system-tests) as ``homeassistant-<digest>/``, keyed by the pins.
  Home Assistant runs with ``--skip-pip``: it never installs anything at run time.
* ``HomeAssistant(broker, workdir)``: starts ``python -m homeassistant --skip-pip`` on a minimal
  ``configuration.yaml`` (no ``default_config:``, no cloud, no updater; ``http`` on 127.0.0.1),
  creates the owner through the onboarding REST API, trades the auth code for tokens, makes a
  long-lived token over the websocket API, adds the MQTT integration through the config-flow
  REST API and waits for Home Assistant's birth message (``homeassistant/status`` = ``online``),
  which it sends once connected and subscribed to discovery. Then ``states()``, ``state()``,
  ``entity_id(unique_id)``, ``wait_for()``, ``call_service()``, ``ws()`` (one websocket
  command), ``log()``, and ``wait_subscribed(topic, since=log_mark())`` before publishing a
  non-retained message an entity has only just subscribed to.
* The fixture ``homeassistant`` (session scope) on the session broker ``mosquitto``::

      pytest_plugins = ["helpers.broker", "helpers.homeassistant"]

Home Assistant may reach 127.0.0.1 only: a ``sitecustomize`` loaded into its interpreter refuses
(and records) every TCP connection, datagram and name lookup beyond loopback;
``network_attempts()`` lists them and the fixture fails when there are any.

Entity ids Home Assistant 2024.3 gives MQTT discovery entities (``entity_id(unique_id)`` looks
them up): with a ``device`` and a ``unique_id`` the entity is named after the device,
``<component>.<device name>_<name>`` (friendly name "<device name> <name>"); ``"name": null``
gives ``<component>.<device name>``; no ``name`` at all gives the device class's name, else
"MQTT Sensor" and the like; a name that starts with the device name is not shortened
(``sensor.porch_pi_porch_pi_fps``); ``object_id`` sets the entity id outright; without a
``unique_id`` the device block is ignored (``sensor.<name>``). The discovery topic's node and
object ids never show in the entity id.

To build the cache ahead of a test run::

    .venv/bin/python -c 'import sys; sys.path[:0] = ["tests"]
    from helpers.homeassistant import ha_python; print(ha_python())'
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from helpers.broker import Subscriber, free_port

CACHE = Path(os.environ.get("EDGED_SYSTEM_CACHE", "/var/cache/edged-system-tests"))
RECIPE = "1"  # bump when the build steps change in a way the pins cannot show
HA_VERSION = "2024.3.3"

# What the loaded integrations import, beyond Home Assistant's own dependencies. Home Assistant
# would pip-install most of these at run time (from each manifest's "requirements"); some are
# imported without being declared, found by importing every module that loads here.
REQUIREMENTS = (
    f"homeassistant=={HA_VERSION}",
    "paho-mqtt==1.6.1",  # mqtt
    "home-assistant-frontend==20240307.0",  # frontend (always set up; recovery mode without it)
    "Pillow==10.2.0",  # image_upload <- person <- onboarding
    "janus==1.0.0",  # file_upload <- mqtt
    "psutil-home-assistant==0.0.1",  # hardware (always set up)
    "securetar==2024.2.1",  # backup (always set up)
    "SQLAlchemy==2.0.27",  # recorder's module, imported by analytics <- onboarding
    "fnv-hash-fast==0.5.0",  # ditto
    "numpy==1.26.0",  # stream's module, imported by camera (an MQTT platform), undeclared
    "PyTurboJPEG==1.7.1",  # camera
    # hass_nabucasa (imported by http's forwarded middleware on the first request) imports
    # acme, which breaks on josepy 2 ("module 'josepy' has no attribute 'ComparableX509'").
    "josepy==1.14.0",
)

# The whole environment as first built and checked (pip freeze), used as pip constraints so a
# rebuild gets the same releases. To move Home Assistant: change the pins above, drop this list,
# build, check, and paste the new venv's `pip freeze` here.
_LOCK = """
acme==2.8.0 aiohttp==3.9.3 aiohttp-cors==0.7.0 aiohttp-fast-url-dispatcher==0.3.0
aiohttp-zlib-ng==0.3.1 aiooui==0.1.11 aiosignal==1.4.0 anyio==4.16.0 astral==2.2
async-interrupt==1.1.1 async-timeout==5.0.1 atomicwrites-homeassistant==1.4.1 attrs==23.2.0
awesomeversion==24.2.0 bcrypt==4.1.2 bleak==3.1.0 bleak-retry-connector==4.7.1
bluetooth-adapters==2.4.0 bluetooth-auto-recovery==1.6.4 bluetooth-data-tools==1.28.4
boto3==1.44.18 botocore==1.44.18 btsocket==0.3.0 certifi==2026.10.19.post1 cffi==2.1.1
charset-normalizer==3.5.3 ciso8601==2.3.1 cryptography==42.0.5 dbus-fast==5.2.0 ecdsa==0.19.2
envs==1.4 fnv-hash-fast==0.5.0 fnvhash==0.1.0 frozenlist==1.8.0 greenlet==3.5.6 h11==0.16.0
habluetooth==6.1.0 hass-nabucasa==0.78.0 home-assistant-bluetooth==1.12.0
home-assistant-frontend==20240307.0 homeassistant==2024.3.3 httpcore==1.0.9 httpx==0.27.0
idna==3.21 ifaddr==0.2.0 janus==1.0.0 Jinja2==3.1.3 jmespath==1.1.0 josepy==1.14.0
lru-dict==1.3.0 MarkupSafe==3.0.4 multidict==6.9.1 numpy==1.26.0 orjson==3.9.15 packaging==26.4
paho-mqtt==1.6.1 pillow==10.2.0 psutil==7.2.2 psutil-home-assistant==0.0.1 pyasn1==0.6.5
pycognito==2023.5.0 pycparser==3.12 PyJWT==2.8.0 pyOpenSSL==24.0.0 pyRFC3339==2.1.1
PyRIC==0.1.6.3 python-dateutil==2.9.0.post0 python-jose==3.5.0 python-slugify==8.0.4
PyTurboJPEG==1.7.1 pytz==2026.6 PyYAML==6.0.1 requests==2.31.0 rsa==4.9.1 s3transfer==0.19.3
securetar==2024.2.1 six==1.17.0 sniffio==1.3.1 snitun==0.36.2 SQLAlchemy==2.0.27
text-unidecode==1.3 typing_extensions==4.16.0 uart-devices==0.1.1 ulid-transform==0.9.0
urllib3==1.26.20 usb-devices==0.5.1 voluptuous==0.13.1 voluptuous-serialize==2.6.0 yarl==1.9.4
zlib-ng==1.1.0
"""
LOCK = _LOCK.split()

# Run in the new venv before it is published: every module Home Assistant imports here must
# import (with --skip-pip a missing one would only show as an error in a test's log).
_IMPORT_CHECK = r"""
import importlib, json, sys
from pathlib import Path
import homeassistant.components as components
from homeassistant import bootstrap
from homeassistant.components.mqtt.const import PLATFORMS
base = Path(components.__file__).parent
todo = [*bootstrap.CORE_INTEGRATIONS, *bootstrap.DEFAULT_INTEGRATIONS, "logger", "system_log",
        "http", "api", "mqtt", *(str(p) for p in PLATFORMS)]
seen = set()
while todo:
    domain = todo.pop()
    if domain not in seen:
        seen.add(domain)
        todo += json.loads((base / domain / "manifest.json").read_text()).get("dependencies", [])
modules = [f"homeassistant.components.{d}" for d in sorted(seen)]
modules += [f"homeassistant.components.mqtt.{p}" for p in PLATFORMS]
failed = []
for module in modules:
    try:
        importlib.import_module(module)
    except Exception as exc:
        failed.append(f"{module}: {exc!r}")
if failed:
    sys.exit("; ".join(failed))
print(len(modules))
"""

# Loaded into Home Assistant's interpreter (PYTHONPATH): nothing beyond loopback.
_NETGUARD = r'''"""Written by tests/helpers/homeassistant.py: Home Assistant under test may reach
127.0.0.1 only. Every refused attempt is appended to $EDGED_HA_NETGUARD_LOG."""
import errno
import ipaddress
import os
import socket
import traceback

_LOG = os.environ.get("EDGED_HA_NETGUARD_LOG", "")
_INET = (socket.AF_INET, socket.AF_INET6)


def _local(host):
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).split("%", 1)[0]
    if host in ("", "localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ip_literal(host):
    try:
        ipaddress.ip_address(str(host).split("%", 1)[0])
        return True
    except ValueError:
        return False


def _record(what, target):
    frames = [f for f in traceback.extract_stack()[:-2] if f.filename != __file__][-3:]
    where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(frames))
    if _LOG:
        with open(_LOG, "a") as log:
            log.write(f"{what} {target!r} from {where}\n")


def _refuse(what, target):
    _record(what, target)
    raise OSError(errno.ENETUNREACH,
                  f"test harness: no network beyond 127.0.0.1 ({what} {target!r})")


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
_sendto, _sendmsg = socket.socket.sendto, socket.socket.sendmsg
_send, _sendall = socket.socket.send, socket.socket.sendall


def _check_address(sock, what, address):
    if sock.family in _INET and isinstance(address, tuple) and not _local(address[0]):
        _refuse(what, address)


def _check_datagram_peer(sock, what):
    # A datagram socket may be "connected" anywhere (it sends nothing; Home Assistant does it to
    # learn its source address); sending through it is what counts.
    if sock.family in _INET and sock.type == socket.SOCK_DGRAM:
        try:
            peer = sock.getpeername()
        except OSError:
            return
        if not _local(peer[0]):
            _refuse(what, peer)


def connect(self, address):
    if self.type != socket.SOCK_DGRAM:
        _check_address(self, "connect", address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.type != socket.SOCK_DGRAM:
        _check_address(self, "connect", address)
    return _connect_ex(self, address)


def sendto(self, data, *args):
    _check_address(self, "sendto", args[-1])
    return _sendto(self, data, *args)


def sendmsg(self, buffers, *args):
    if len(args) >= 3:
        _check_address(self, "sendmsg", args[2])
    else:
        _check_datagram_peer(self, "sendmsg")
    return _sendmsg(self, buffers, *args)


def send(self, data, *args):
    _check_datagram_peer(self, "send")
    return _send(self, data, *args)


def sendall(self, data, *args):
    _check_datagram_peer(self, "send")
    return _sendall(self, data, *args)


socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
socket.socket.sendto, socket.socket.sendmsg = sendto, sendmsg
socket.socket.send, socket.socket.sendall = send, sendall

_getaddrinfo, _gethostbyname = socket.getaddrinfo, socket.gethostbyname
_gethostbyname_ex, _gethostbyaddr = socket.gethostbyname_ex, socket.gethostbyaddr


def _check_name(host):
    if host is not None and not _local(host) and not _ip_literal(host):
        _record("resolve", host)
        raise socket.gaierror(socket.EAI_NONAME, f"test harness: no name lookups ({host!r})")


def getaddrinfo(host, *args, **kwargs):
    _check_name(host)
    return _getaddrinfo(host, *args, **kwargs)


def gethostbyname(host):
    _check_name(host)
    return _gethostbyname(host)


def gethostbyname_ex(host):
    _check_name(host)
    return _gethostbyname_ex(host)


def gethostbyaddr(host):
    if not _local(host):
        _record("resolve", host)
        raise socket.herror(1, f"test harness: no name lookups ({host!r})")
    return _gethostbyaddr(host)


socket.getaddrinfo, socket.gethostbyname = getaddrinfo, gethostbyname
socket.gethostbyname_ex, socket.gethostbyaddr = gethostbyname_ex, gethostbyaddr

if _LOG:  # the harness checks that the guard is in place
    with open(_LOG + ".active", "w") as active:
        active.write(str(os.getpid()))
'''

START_TIMEOUT = 180.0  # 2 shared cores, first start after a build: be patient
STOP_TIMEOUT = 30.0

# Figures for the terminal summary, in the order measured.
REPORT: dict[str, str] = {}

T = TypeVar("T")


class HomeAssistantError(Exception):
    """Building or driving Home Assistant failed (one line, with the log's tail where useful)."""


def _say(message: str) -> None:
    print(f"homeassistant: {message}", file=sys.stderr, flush=True)


# --- the cached virtualenv ---------------------------------------------------------------------

_held_locks: list[Any] = []  # the venvs this process uses: shared locks, held until it exits


def _digest() -> str:
    digest = hashlib.sha256()
    for part in (RECIPE, platform.machine(), sys.base_prefix, platform.python_version(),
                 *REQUIREMENTS, *LOCK):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _run(cmd: list[str], what: str, timeout: float, log: Path) -> str:
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=out, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise HomeAssistantError(f"{what}: no result after {timeout:.0f} s") from None
        out.write(proc.stdout)
    if proc.returncode != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines()
                 if line.strip() and "is ignored: it is neither" not in line]
        raise HomeAssistantError(f"{what} failed (exit {proc.returncode}): "
                                 f"{' | '.join(lines[-4:])} (log: {log})")
    return proc.stdout.decode(errors="replace")


def _prune(keep: Path) -> None:
    """Delete what interrupted builds left and the builds of other pins nobody uses (the caller
    holds the build lock)."""
    for path in CACHE.glob(".homeassistant-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in CACHE.glob("homeassistant-*"):
        if path == keep or not path.is_dir():
            continue
        with open(path / ".in-use", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a test session runs from it right now
            shutil.rmtree(path, ignore_errors=True)


def _build(final: Path, say: Callable[[str], None]) -> None:
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".homeassistant-", dir=CACHE))
    log = tmp / "build.log"
    tmp.chmod(0o755)
    say(f"building a venv with homeassistant=={HA_VERSION} in {final} "
        f"(once; a few minutes; log {final / 'build.log'})")
    _run([sys.executable, "-m", "venv", str(tmp)], "python -m venv", 300, log)
    python = str(tmp / "bin" / "python")
    constraints = tmp / "constraints.txt"
    constraints.write_text("\n".join(LOCK) + "\n")
    say(f"pip install {' '.join(REQUIREMENTS)}")
    _run([python, "-m", "pip", "install", "--no-input", "-q", "--no-warn-script-location",
          "-c", str(constraints), *REQUIREMENTS], "pip install homeassistant", 1800, log)
    _run([python, "-m", "pip", "check"], "pip check (Home Assistant's venv)", 300, log)
    say("importing every integration Home Assistant sets up here")
    count = _run([python, "-c", _IMPORT_CHECK], "import check", 600, log).strip()
    # The interpreter is a symlink to the base Python and nothing else in a venv needs its own
    # path once run as `python -m ...`: the finished venv is moved into place whole.
    tmp.rename(final)
    took = time.monotonic() - started
    REPORT["Home Assistant venv built"] = f"{took:.0f} s ({count} modules import; {final})"
    say(f"built in {took:.0f} s")


def ha_python(say: Callable[[str], None] = _say) -> Path:
    """The interpreter of the cached Home Assistant venv (built on first use).

    The venv stays locked (shared) while this process runs, so no other session prunes it."""
    final = CACHE / f"homeassistant-{_digest()}"
    python = final / "bin" / "python"
    if any(lock.name == str(final / ".in-use") for lock in _held_locks):
        return python
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "homeassistant.lock", "w") as build_lock:
        try:
            fcntl.flock(build_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("waiting for another session's Home Assistant build")
            fcntl.flock(build_lock, fcntl.LOCK_EX)
        if not final.is_dir():
            _build(final, say)
        in_use = open(final / ".in-use", "a")  # noqa: SIM115 (held until the process exits)
        fcntl.flock(in_use, fcntl.LOCK_SH)
        _held_locks.append(in_use)
        _prune(keep=final)
    if not python.exists():
        raise HomeAssistantError(f"{python} is missing (its base Python moved?): delete {final}")
    return python


# --- talking to Home Assistant -----------------------------------------------------------------

class _Broker(Protocol):
    host: str
    port: int


class _WebSocket:
    """The smallest websocket client Home Assistant's API needs (text frames, no extensions)."""

    def __init__(self, host: str, port: int, path: str, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise HomeAssistantError(f"websocket {path}: connection closed in the handshake")
            head += chunk
        head, self._buffer = head.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise HomeAssistantError(f"websocket {path}: {head.splitlines()[0].decode()}")

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise HomeAssistantError("websocket closed by Home Assistant")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send(self, message: dict[str, Any]) -> None:
        self._send_frame(0x1, json.dumps(message).encode())

    def recv(self) -> dict[str, Any]:
        message = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else b""
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = first & 0x0F
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
            elif opcode == 0x8:
                raise HomeAssistantError("websocket closed by Home Assistant")
            elif opcode in (0x0, 0x1, 0x2):
                message += payload
                if first & 0x80:
                    return json.loads(message)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send_frame(0x8, b"")
        self.sock.close()


class HomeAssistant:
    """One Home Assistant process on 127.0.0.1 with the MQTT integration on ``broker``."""

    host = "127.0.0.1"

    def __init__(self, broker: _Broker, workdir: Path | None = None,
                 python: Path | None = None) -> None:
        self.broker = broker
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="homeassistant-"))
        self.config_dir = self.workdir / "config"
        self.python = python
        self.port = 0
        self.token = ""  # long-lived access token of the owner
        self.mqtt_entry_id = ""
        self.timings: dict[str, float] = {}  # seconds from the process start
        self.process: subprocess.Popen | None = None
        self.netguard_log = self.workdir / "network-attempts.log"
        self._out: Any = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # --- life cycle ---

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.config_dir / "home-assistant.log"

    def start(self) -> None:
        """Start Home Assistant, onboard the owner, add MQTT; return once it is connected and
        subscribed to discovery (its birth message arrived)."""
        assert self.process is None, "already running"
        python = self.python or ha_python()
        self.port = free_port()
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        guard = self.workdir / "netguard"
        guard.mkdir(exist_ok=True)
        (guard / "sitecustomize.py").write_text(_NETGUARD)
        self.netguard_log.write_text("")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir),
               "LANG": "C.UTF-8", "TZ": "UTC", "PYTHONPATH": str(guard),
               "EDGED_HA_NETGUARD_LOG": str(self.netguard_log)}
        self._out = open(self.workdir / "hass.out", "wb")  # noqa: SIM115 (closed in stop)
        started = self._started = time.monotonic()
        self.process = subprocess.Popen(
            [str(python), "-m", "homeassistant", "--config", str(self.config_dir), "--skip-pip",
             "--log-no-color"],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT, env=env,
            cwd=self.workdir, start_new_session=True)
        try:
            self._wait_http(started + START_TIMEOUT)
            self._mark("http up (onboarding API answers)")
            active = Path(f"{self.netguard_log}.active")
            if not active.exists() or active.read_text() != str(self.process.pid):
                raise HomeAssistantError(f"the network guard is not loaded in Home Assistant "
                                         f"({guard / 'sitecustomize.py'})")
            self._onboard()
            self._mark("owner onboarded, long-lived token")
            status = Subscriber(self.broker, "homeassistant/status")
            try:
                self._add_mqtt()
                self._mark("MQTT config entry loaded")
                while not status.wait(lambda: any(m.payload == b"online" for m in
                                                  status.on("homeassistant/status")), 0.5):
                    self._check_alive()
                    if time.monotonic() > started + START_TIMEOUT:
                        raise HomeAssistantError("no birth message (homeassistant/status "
                                                 f"online) from Home Assistant{self._tail()}")
            finally:
                status.close()
            self._mark("MQTT connected, discovery subscribed (birth message)")
            about = self._request("GET", "/api/")
            if about.get("message") != "API running.":
                raise HomeAssistantError(f"GET /api/: {about}")
        except BaseException:
            self.stop()
            raise

    def _mark(self, what: str) -> None:
        self.timings[what] = round(time.monotonic() - self._started, 2)

    def _write_config(self) -> None:
        # Only what the tests need: no default_config (it pulls cloud, updater, zeroconf, ...).
        # Home Assistant always sets up its default integrations (frontend, backup, network, ...):
        # none of them reaches the network unless asked to. MQTT comes from a config entry.
        (self.config_dir / "configuration.yaml").write_text(f"""\
homeassistant:
  name: edged tests
  latitude: 52.37
  longitude: 4.89
  elevation: 0
  unit_system: metric
  time_zone: UTC
  currency: EUR
  country: NL
  language: en
http:
  server_host: 127.0.0.1
  server_port: {self.port}
  ip_ban_enabled: false
api:
logger:
  default: warning
  logs:
    homeassistant.bootstrap: info
    homeassistant.components.mqtt: debug
    paho.mqtt.client: debug  # SUBSCRIBE / SUBACK, for wait_subscribed()
""")

    def _wait_http(self, deadline: float) -> None:
        while True:
            self._check_alive()
            try:
                with self._opener.open(f"{self.url}/api/onboarding", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise HomeAssistantError(f"Home Assistant's HTTP API did not come up within "
                                         f"{START_TIMEOUT:.0f} s{self._tail()}")
            time.sleep(0.1)

    def _onboard(self) -> None:
        """The owner through the onboarding API (its auth code), tokens from /auth/token, then a
        long-lived access token over the websocket API. Only the user step is done: the
        core_config step would set up integrations that go online (met, radio_browser, ...)."""
        client_id = f"{self.url}/"
        password = uuid.uuid4().hex
        code = self._request("POST", "/api/onboarding/users", {
            "client_id": client_id, "name": "edged tests", "username": "edged",
            "password": password, "language": "en"}, auth=False)["auth_code"]
        tokens = self._request("POST", "/auth/token", form={
            "grant_type": "authorization_code", "code": code, "client_id": client_id},
            auth=False)
        self.token = tokens["access_token"]
        self.token = self.ws("auth/long_lived_access_token", client_name="edged tests",
                             lifespan=30)
        (self.workdir / "token").write_text(self.token + "\n")

    def _add_mqtt(self) -> None:
        """The MQTT integration through its config flow (user -> broker step); discovery is on
        with the prefix ``homeassistant`` by default."""
        flow = self._request("POST", "/api/config/config_entries/flow",
                             {"handler": "mqtt", "show_advanced_options": False})
        if flow.get("step_id") != "broker":
            raise HomeAssistantError(f"MQTT config flow: expected the broker step, got {flow}")
        result = self._request("POST", f"/api/config/config_entries/flow/{flow['flow_id']}",
                               {"broker": self.broker.host, "port": self.broker.port})
        if result.get("type") != "create_entry":
            raise HomeAssistantError(f"MQTT config flow: {result}{self._tail()}")
        self.mqtt_entry_id = result["result"]["entry_id"]
        deadline = time.monotonic() + 60
        while (state := self._mqtt_entry_state()) != "loaded":
            if state in ("setup_error", "setup_retry", "not_loaded") or \
                    time.monotonic() > deadline:
                raise HomeAssistantError(f"MQTT config entry is {state}{self._tail()}")
            time.sleep(0.1)

    def _mqtt_entry_state(self) -> str | None:
        for entry in self._request("GET", "/api/config/config_entries/entry"):
            if entry["entry_id"] == self.mqtt_entry_id:
                return entry["state"]
        return None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT`` seconds."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if self._out is not None:
            self._out.close()
            self._out = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> HomeAssistant:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _check_alive(self) -> None:
        if self.process is None:
            raise HomeAssistantError("Home Assistant is not running")
        if self.process.poll() is not None:
            out = (self.workdir / "hass.out").read_text(errors="replace")[-1500:]
            raise HomeAssistantError(f"Home Assistant exited ({self.process.returncode}): "
                                     f"{out}{self._tail()}")

    # --- the APIs ---

    def _request(self, method: str, path: str, data: Any = None, *, auth: bool = True,
                 form: dict[str, str] | None = None, allow: tuple[int, ...] = ()) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif data is not None:
            body = json.dumps(data).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(f"{self.url}{path}", body, headers, method=method)
        try:
            with self._opener.open(request, timeout=30) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in allow:
                return None
            raise HomeAssistantError(f"{method} {path}: HTTP {exc.code} "
                                     f"{exc.read()[:500].decode(errors='replace')}"
                                     f"{self._tail()}") from None
        return json.loads(text) if text else None

    def ws(self, command: str, **fields: Any) -> Any:
        """One websocket API command (``type`` and its fields); its ``result``."""
        sock = _WebSocket(self.host, self.port, "/api/websocket", timeout=30)
        try:
            if sock.recv().get("type") != "auth_required":
                raise HomeAssistantError("websocket: no auth_required")
            sock.send({"type": "auth", "access_token": self.token})
            if (reply := sock.recv()).get("type") != "auth_ok":
                raise HomeAssistantError(f"websocket auth: {reply}")
            sock.send({"id": 1, "type": command, **fields})
            while (reply := sock.recv()).get("id") != 1 or reply.get("type") != "result":
                pass
        finally:
            sock.close()
        if not reply.get("success"):
            raise HomeAssistantError(f"websocket {command}: {reply.get('error')}")
        return reply.get("result")

    def states(self) -> list[dict[str, Any]]:
        """Every entity's state (``GET /api/states``)."""
        return self._request("GET", "/api/states")

    def state(self, entity_id: str) -> dict[str, Any] | None:
        """One entity's state, or None when Home Assistant has no such entity."""
        return self._request("GET", f"/api/states/{entity_id}", allow=(404,))

    def entity_id(self, unique_id: str, platform: str = "mqtt") -> str | None:
        """The entity id Home Assistant gave the entity with ``unique_id`` (entity registry)."""
        for entry in self.ws("config/entity_registry/list"):
            if entry["unique_id"] == unique_id and entry["platform"] == platform:
                return entry["entity_id"]
        return None

    def call_service(self, domain: str, service: str,
                     data: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Call a service (``POST /api/services/<domain>/<service>``); the states it changed."""
        return self._request("POST", f"/api/services/{domain}/{service}", data or {})

    def wait_for(self, predicate: Callable[[], T], timeout: float = 20.0,
                 what: str | None = None) -> T:
        """Poll ``predicate()`` until it returns something true; return that. On timeout an
        AssertionError naming ``what`` with the tail of Home Assistant's log."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if result := predicate():
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or getattr(predicate, '__name__', 'predicate')}: "
                                     f"not true after {timeout:.0f} s{self._tail()}")
            time.sleep(0.1)

    def log_mark(self) -> int:
        """The current end of home-assistant.log, for ``wait_subscribed(since=...)``."""
        return self.log_file.stat().st_size if self.log_file.exists() else 0

    def wait_subscribed(self, topic: str, since: int = 0, timeout: float = 20.0) -> None:
        """Wait until the broker has acknowledged a SUBSCRIBE of Home Assistant's to ``topic``
        (sent after the log offset ``since``, see ``log_mark()``) that no UNSUBSCRIBE followed,
        so that a message published from now on reaches Home Assistant.

        Needed for non-retained messages: an entity shows in the state machine before its
        topics are subscribed (Home Assistant batches subscriptions 0.1 s apart), so a message
        published as soon as the entity appears can be lost. Take the mark before publishing
        the discovery config: a re-announced entity subscribes again. Read from paho's debug
        lines in home-assistant.log: the SUBSCRIBE packets with their topics, and the SUBACKs
        (which name neither topic nor mid) counted, since the broker acknowledges one
        connection's subscriptions in order."""
        wanted = re.escape(repr(topic.encode()).encode())
        pattern = re.compile(rb"Sending (UN)?SUBSCRIBE \(d\d, m\d+\) .*" + wanted + rb"[,\]]")

        def acknowledged() -> bool:
            log = self.log_file.read_bytes()  # offsets in bytes, as log_mark()'s
            matches = list(pattern.finditer(log))
            latest = matches[-1] if matches else None
            if latest is None or latest.group(1) or latest.start() < since:
                return False
            # Which SUBSCRIBE packet of the connection's this is, and whether its SUBACK came.
            before = log.count(b"Sending SUBSCRIBE (", 0, latest.start())
            return log.count(b"Received SUBACK") > before

        self.wait_for(acknowledged, timeout, f"Home Assistant subscribed to {topic}")

    def log(self, lines: int = 60) -> str:
        """The last ``lines`` lines of home-assistant.log."""
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def network_attempts(self) -> list[str]:
        """What Home Assistant tried to reach beyond 127.0.0.1 (refused), one line each."""
        return self.netguard_log.read_text().splitlines() if self.netguard_log.exists() else []

    def _tail(self) -> str:
        return f"\n--- home-assistant.log (tail) ---\n{self.log(40)}"


@pytest.fixture(scope="session", name="homeassistant")
def homeassistant_fixture(request: pytest.FixtureRequest,
                          tmp_path_factory: pytest.TempPathFactory,
                          mosquitto: _Broker) -> Iterator[HomeAssistant]:
    """A running Home Assistant with MQTT discovery on the session broker ``mosquitto``.

    Fails (at teardown) when Home Assistant tried to reach anything beyond 127.0.0.1."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    try:
        if capture is not None:  # the first build takes minutes: show its progress
            with capture.global_and_fixture_disabled():
                python = ha_python()
        else:
            python = ha_python()
        ha = HomeAssistant(mosquitto, tmp_path_factory.mktemp("homeassistant"), python)
        ha.start()
    except HomeAssistantError as exc:
        pytest.fail(str(exc), pytrace=False)
    REPORT["Home Assistant start (s from exec)"] = ", ".join(
        f"{what}: {t:.1f}" for what, t in ha.timings.items())
    try:
        yield ha
    finally:
        attempts = ha.network_attempts()
        ha.stop()
    assert not attempts, f"Home Assistant tried to reach beyond 127.0.0.1: {attempts}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The harness's figures (venv build, Home Assistant start-up) after the run."""
    if REPORT:
        terminalreporter.section("Home Assistant harness")
        for key, value in REPORT.items():
            terminalreporter.write_line(f"{key}: {value}")


__all__ = ["HomeAssistant", "HomeAssistantError", "ha_python", "homeassistant_fixture",
           "REQUIREMENTS", "HA_VERSION"]

