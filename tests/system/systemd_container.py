"""A Debian bookworm root of the host's architecture with edged installed, and that root booted
under real systemd in a ``systemd-nspawn`` container.

The root (debootstrap minbase + systemd, Python, mosquitto, kmod; a venv at /opt/edged holding
edged's runtime dependencies as wheels downloaded on the host, never torch) is built once and
cached under ``$EDGED_SYSTEM_CACHE`` (default /var/cache/edged-system-tests), keyed by what went
into it. Each session installs a wheel built from the checkout (skipped when the same sources are
installed). The same root is the QEMU VM's initramfs (``vm.py``).

A container boots that root read-only under an overlay (its writes go to a scratch folder):
``systemd-nspawn --boot --register=no --keep-unit --private-network``, driven from the host with
``nsenter -t <container PID 1> -a``. The shipped ``systemd/edged.service`` is installed as is.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from system.arm64 import _digest, check_host, debian_mirror, project_files

REPO = Path(__file__).resolve().parents[2]
ARCH = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                      check=False).stdout.strip() or "amd64"
CACHE = Path(os.environ.get("EDGED_SYSTEM_CACHE", "/var/cache/edged-system-tests")) / ARCH
SUITE = "bookworm"
# systemd for the container (procps: the unit's ExecReload runs /bin/kill, as on Raspberry Pi
# OS), kmod for the VM's modprobe, mosquitto as the container's broker.
ROOT_PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps", "kmod", "python3", "python3-venv",
                 "mosquitto", "mosquitto-clients")
VENV = "/opt/edged"
PLATFORM = {"amd64": "manylinux_2_28_x86_64", "arm64": "manylinux_2_28_aarch64"}[ARCH]
RECIPE = "1"  # bump when the build steps change in a way the cache keys cannot see
HOST_TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container",
              "nsenter": "util-linux", "mount": "mount"}
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

TEST_DIR = "/opt/edged-test"  # test-only files inside the root: the camera server, frames, model
CAMERA_PORT = 8554
CAMERA_UNIT = "edged-test-camera.service"
RECORDER_UNIT = "edged-test-mqtt.service"
MQTT_LOG = "/var/log/edged-test-mqtt.log"

# An MJPEG camera inside the container: the test helper's server over JPEG frames on disk.
_CAMERA_SCRIPT = f"""import sys, threading
from pathlib import Path
sys.path.insert(0, "{TEST_DIR}")
from mjpeg_server import MjpegServer
frames = [p.read_bytes() for p in sorted(Path("{TEST_DIR}/frames").glob("*.jpg"))]
MjpegServer(frames, fps=float(sys.argv[1]), port={CAMERA_PORT}).start()
threading.Event().wait()
"""

_TEST_UNITS = {
    CAMERA_UNIT: f"""[Unit]
Description=edged test camera (MJPEG over HTTP on 127.0.0.1:{CAMERA_PORT})
[Service]
ExecStart=/usr/bin/python3 {TEST_DIR}/camera.py 10
""",
    RECORDER_UNIT: f"""[Unit]
Description=edged test recorder: every edged/# message, one line each
Requires=mosquitto.service
After=mosquitto.service
[Service]
ExecStart=/usr/bin/mosquitto_sub -h 127.0.0.1 -t edged/# -F "%%U %%t %%p"
StandardOutput=append:{MQTT_LOG}
Restart=on-failure
RestartSec=1
""",
}

# Figures for the terminal summary, in the order measured.
REPORT: dict[str, str] = {}


class SystemTierError(Exception):
    """A prerequisite of the tier is missing or a build step failed (one line)."""


def check(cmd: Sequence[str], what: str, timeout: float = 600,
          cwd: str | Path | None = None) -> str:
    """Run a host command; its stdout, or one ``SystemTierError`` line with its last output."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, check=False)
    except subprocess.TimeoutExpired:
        raise SystemTierError(f"{what}: no result after {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise SystemTierError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def publish_dir(tmp: Path, final: Path) -> Path:
    """Move a finished build into place (a crash mid-build never leaves a half-built cache)."""
    tmp.rename(final)
    return final


# ---------------------------------------------------------------------------------------------
# The device root


@dataclass(frozen=True)
class DeviceRoot:
    """A Debian root of the host's architecture with edged installed in ``VENV``."""

    path: Path
    edged_digest: str  # of the checkout sources installed: part of every key built on top

    def nspawn(self, argv: Sequence[str], binds: dict[Path, str] | None = None,
               what: str | None = None, timeout: float = 900) -> str:
        """Run one command in the root (a throw-away container, no network); its stdout."""
        return check(["systemd-nspawn", "--quiet", "--register=no", "--keep-unit",
                      "--private-network", "--pipe", "-D", str(self.path),
                      *(f"--bind-ro={host}:{guest}" for host, guest in (binds or {}).items()),
                      *argv], what or f"in the root: {' '.join(argv)[:80]}", timeout)


def runtime_pins() -> list[str]:
    """``name==version`` of pyproject's runtime dependencies as installed on the host, so the
    device runs the same ONNX Runtime, OpenCV and numpy releases as the host's tests."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [re.match(r"[A-Za-z0-9_.-]+", dep).group(0) for dep in project["dependencies"]]
    try:
        return [f"{name}=={importlib.metadata.version(name)}" for name in names]
    except importlib.metadata.PackageNotFoundError as exc:
        raise SystemTierError(f"the host venv lacks the runtime dependency {exc.name}") from None


def download_wheels(pins: list[str]) -> Path:
    """The runtime dependencies' wheels for the device's platform, downloaded on the host."""
    final = CACHE / f"wheels-{_digest(RECIPE, PLATFORM, *pins)}"
    if final.is_dir():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".wheels-", dir=CACHE))
    check([sys.executable, "-m", "pip", "download", "-q", "-d", str(tmp), "--platform",
           PLATFORM, "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
           *pins], f"downloading {PLATFORM} wheels ({' '.join(pins)})", 900)
    return publish_dir(tmp, final)


def build_root(mirror: str, pins: list[str], wheels: Path) -> Path:
    """debootstrap a minbase root with ``ROOT_PACKAGES``, then a venv holding the runtime
    dependencies (edged itself is installed per checkout by ``install_edged``)."""
    final = CACHE / f"root-{_digest(RECIPE, SUITE, ARCH, mirror, *ROOT_PACKAGES, *pins)}"
    if final.is_dir():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".root-", dir=CACHE))
    started = time.monotonic()
    check(["debootstrap", f"--arch={ARCH}", "--variant=minbase",
           f"--include={','.join(ROOT_PACKAGES)}", SUITE, str(tmp), mirror],
          f"debootstrap {SUITE} {ARCH} from {mirror}", 3600)
    shutil.rmtree(tmp / "var/cache/apt/archives", ignore_errors=True)
    (tmp / "var/cache/apt/archives/partial").mkdir(parents=True)
    # The container's console is a pipe: no getty, no waiting for a login.
    (tmp / "etc/hostname").write_text("edged-device\n")
    root = DeviceRoot(tmp, "")
    root.nspawn(["python3", "-m", "venv", VENV], what="python3 -m venv in the root")
    root.nspawn([f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links",
                 "/mnt/wheels", *pins], binds={wheels: "/mnt/wheels"},
                what="installing the runtime wheels in the root")
    REPORT[f"{ARCH} root built (debootstrap + venv)"] = f"{time.monotonic() - started:.0f} s"
    return publish_dir(tmp, final)


def build_wheel(dest: Path) -> Path:
    """A wheel of edged built from a copy of the checkout's sources (building in the checkout
    would leave build/ and egg-info there); returns its path in ``dest``."""
    with tempfile.TemporaryDirectory(prefix="edged-src-") as work:
        for path in project_files():
            target = Path(work) / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        check([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
               "-w", str(dest), work], "building the edged wheel", 300)
    return next(dest.glob("edged-*.whl"))


def sources_digest() -> str:
    """A digest of the checkout files a wheel is built from."""
    files = project_files()
    return _digest(*(str(p.relative_to(REPO)) for p in files), *(p.read_bytes() for p in files))


def install_edged(root: Path, wheels: Path) -> DeviceRoot:
    """Install the checkout's edged (no convert extra: no torch) into the root's venv, with
    ``/usr/local/bin/edged`` where the shipped unit runs it; skipped when these exact sources
    are installed already."""
    digest = sources_digest()
    device = DeviceRoot(root, digest)
    stamp = root / VENV.lstrip("/") / ".edged-sources"
    if stamp.is_file() and stamp.read_text() == digest:
        return device
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edged-wheel-") as dist:
        wheel = build_wheel(Path(dist))
        device.nspawn([f"{VENV}/bin/pip", "uninstall", "-q", "-y", "edged"],
                      what="removing the previous edged from the root")
        device.nspawn([f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links",
                       "/mnt/wheels", f"/mnt/dist/{wheel.name}"],
                      binds={wheels: "/mnt/wheels", Path(dist): "/mnt/dist"},
                      what="installing the edged wheel in the root")
    link = root / "usr/local/bin/edged"
    link.unlink(missing_ok=True)
    link.symlink_to(f"{VENV}/bin/edged")
    stamp.write_text(digest)
    REPORT[f"edged wheel installed in the {ARCH} root"] = f"{time.monotonic() - started:.0f} s"
    return device


class _Summary:
    """Prints ``REPORT`` (build times, run times, the unit's exposure) after the test run."""

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if REPORT:
            terminalreporter.section(f"systemd + V4L2 tier ({ARCH})")
            for key, value in REPORT.items():
                terminalreporter.write_line(f"{key}: {value}")


@pytest.fixture(scope="session")
def device_root(request: pytest.FixtureRequest) -> Iterator[DeviceRoot]:
    """The cached Debian bookworm root (host architecture) with edged from this checkout.

    The cache is locked for the session: a concurrent run waits rather than reinstalling edged
    under a running container or VM.
    """
    request.config.pluginmanager.register(_Summary(), "edged-system-host-summary")
    started = time.monotonic()
    try:
        check_host(HOST_TOOLS, SystemTierError)
        CACHE.mkdir(parents=True, exist_ok=True)
        with open(CACHE / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            pins = runtime_pins()
            wheels = download_wheels(pins)
            root = install_edged(build_root(debian_mirror(), pins, wheels), wheels)
            REPORT[f"{ARCH} root ready"] = f"{time.monotonic() - started:.0f} s ({root.path})"
            yield root
    except SystemTierError as exc:
        pytest.fail(str(exc), pytrace=False)


# ---------------------------------------------------------------------------------------------
# The container


class Overlay:
    """``lower`` seen read-write at ``merged``: writes land in a scratch upper folder."""

    def __init__(self, lower: Path, scratch: Path) -> None:
        self.merged = scratch / "merged"
        for name in ("upper", "work", "merged"):
            (scratch / name).mkdir()
        check(["mount", "-t", "overlay", "overlay", "-o",
               f"lowerdir={lower},upperdir={scratch / 'upper'},workdir={scratch / 'work'}",
               str(self.merged)], "mounting the container's overlay root", 30)

    def close(self) -> None:
        """Unmount (lazily: a process that still holds a file must not fail the teardown)."""
        subprocess.run(["umount", "-l", str(self.merged)], check=False)


def _container_leader(nspawn_pid: int) -> int | None:
    """The host pid of the container's PID 1: nspawn's descendant whose innermost pid is 1."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines()
                          if ":\t" in line)
        except OSError:
            continue
        nspid = fields.get("NSpid", "").split()
        if len(nspid) > 1 and nspid[-1] == "1" and _descends(int(nspid[0]), nspawn_pid):
            return int(nspid[0])
    return None


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


@dataclass
class Container:
    """A booted container; ``root`` is its file system as the host sees it."""

    root: Path
    process: subprocess.Popen
    leader: int
    console: Path

    def run(self, *argv: str, timeout: float = 60, ok: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the container (all its namespaces); ``ok``: fail on non-zero."""
        cmd = ["nsenter", "-t", str(self.leader), "-a", "-r", "-w", "env", "-i",
               f"PATH={GUEST_PATH}", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "LANG=C.UTF-8",
               *argv]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  input=input, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"container: {' '.join(argv)}: no result after {timeout:g} s",
                        pytrace=False)
        if ok and proc.returncode != 0:
            pytest.fail(f"container: {' '.join(argv)} failed (exit {proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip()[-500:]}", pytrace=False)
        return proc

    def systemctl(self, *args: str, timeout: float = 60, ok: bool = True) -> str:
        """``systemctl ARGS`` in the container; its stdout."""
        return self.run("systemctl", *args, timeout=timeout, ok=ok).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """Unit properties from ``systemctl show``."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, since_usec: int = 0) -> list[dict[str, Any]]:
        """The unit's journal entries (JSON objects) since a monotonic time in microseconds."""
        out = self.run("journalctl", "-u", unit, "-o", "json", "--no-pager").stdout
        entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return [e for e in entries if int(e.get("__MONOTONIC_TIMESTAMP", 0)) >= since_usec]

    def messages(self, unit: str, since_usec: int = 0) -> list[str]:
        """The unit's journal lines (MESSAGE fields) since a monotonic time (microseconds)."""
        return [str(e.get("MESSAGE", "")) for e in self.journal(unit, since_usec)]

    def mqtt(self, since: float = 0.0) -> list[tuple[float, str, str]]:
        """(time, topic, payload) of every message the recorder saw since ``since`` (epoch)."""
        log = self.root / MQTT_LOG.lstrip("/")
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        messages = []
        for line in lines:
            parts = line.split(" ", 2)
            if len(parts) == 3 and float(parts[0]) >= since:
                messages.append((float(parts[0]), parts[1], parts[2]))
        return messages

    def write_config(self, data: dict[str, Any]) -> None:
        """Write /etc/edged/edged.yaml (what the shipped unit reads)."""
        path = self.root / "etc/edged/edged.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))

    def console_tail(self, lines: int = 20) -> str:
        """The last lines the container printed on its console (boot messages)."""
        text = self.console.read_text(errors="replace") if self.console.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something true; that value, or a test failure
    naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s", pytrace=False)
        time.sleep(interval)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock of systemd's and the journal's timestamps
    (the container shares the host's)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def prepare_root(root: Path, model: Path, frames: Sequence[bytes]) -> None:
    """Put the shipped unit, the test camera and recorder, the model and the frames into a
    container root."""
    units = root / "etc/systemd/system"
    shutil.copy2(REPO / "systemd" / "edged.service", units / "edged.service")
    for name, text in _TEST_UNITS.items():
        (units / name).write_text(text)
    test_dir = root / TEST_DIR.lstrip("/")
    (test_dir / "frames").mkdir(parents=True)
    for i, jpeg in enumerate(frames):
        (test_dir / "frames" / f"{i:03d}.jpg").write_bytes(jpeg)
    shutil.copy2(REPO / "tests" / "helpers" / "mjpeg_server.py", test_dir / "mjpeg_server.py")
    (test_dir / "camera.py").write_text(_CAMERA_SCRIPT)
    shutil.copy2(model, test_dir / model.name)
    for path in [test_dir, *test_dir.rglob("*")]:  # the service's dynamic user reads them
        path.chmod(0o755 if path.is_dir() else 0o644)


def boot(root: Path, console: Path, timeout: float = 90) -> Container:
    """Boot ``root`` with systemd-nspawn and wait until systemd reports the system up."""
    with open(console, "wb") as out:
        process = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "-D", str(root), "--boot", "--register=no",
             "--keep-unit", "--private-network", "--console=read-only"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)

    def leader() -> int | None:
        if process.poll() is not None:
            pytest.fail(f"systemd-nspawn exited with {process.returncode}: "
                        f"{console.read_text(errors='replace')[-800:]}", pytrace=False)
        return _container_leader(process.pid)

    try:
        return _wait_booted(Container(root, process, wait_until(leader, 30, "container PID 1"),
                                      console), timeout)
    except BaseException:  # a container that never came up must not outlive the test
        process.kill()
        process.wait()
        raise


def _wait_booted(container: Container, timeout: float) -> Container:
    """Wait until systemd in ``container`` has finished booting."""

    def system_state() -> str:
        # "offline" until systemd listens on its socket; then --wait returns once boot is done.
        state = container.run("systemctl", "is-system-running", "--wait", timeout=timeout,
                              ok=False).stdout.strip()
        return "" if state == "offline" else state

    state = wait_until(system_state, timeout, "systemd in the container answering")
    if state not in ("running", "degraded"):
        pytest.fail(f"container: system state {state!r} after boot:\n"
                    f"{container.console_tail()}", pytrace=False)
    return container


def shut_down(container: Container, timeout: float = 30) -> None:
    """Power the container off (nspawn turns SIGTERM into an orderly shutdown)."""
    container.process.send_signal(signal.SIGTERM)
    try:
        container.process.wait(timeout)
    except subprocess.TimeoutExpired:
        container.process.kill()
        container.process.wait()


def bikes_jpegs(clip: Path, count: int, stride: int = 5) -> list[bytes]:
    """Every ``stride``-th frame of ``clip`` as JPEG, ``count`` of them."""
    import cv2

    capture = cv2.VideoCapture(str(clip))
    frames: list[bytes] = []
    index = 0
    while len(frames) < count:
        ok, image = capture.read()
        assert ok, f"{clip}: only {len(frames)} frames at stride {stride}"
        if index % stride == 0:
            frames.append(cv2.imencode(".jpg", image)[1].tobytes())
        index += 1
    capture.release()
    return frames


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a zombie's cmdline is empty)."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def remove_stale_containers(grace: float = 15.0) -> None:
    """Stop and remove the containers an interrupted run left in the cache (their nspawn
    stopped, the overlay unmounted, the scratch folder deleted). Safe while ``device_root``
    holds the cache lock: no other run owns them. A stale container once made the next run's
    watchdog test fail (its SIGSTOP to the unit ended in an I/O error)."""
    for scratch in CACHE.glob("nspawn-*"):
        merged = str(scratch / "merged").encode()
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"systemd-nspawn") and merged in argv:
                pids.append(int(cmdline.parent.name))
        for pid in pids:  # nspawn turns SIGTERM into an orderly shutdown
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(_running(pid) for pid in pids):
            if time.monotonic() > deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        subprocess.run(["umount", "-l", merged], check=False, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def systemd_container(device_root: DeviceRoot, converted_model: Callable[..., Path],
                      bikes_clip: Path) -> Iterator[Container]:
    """A booted container of the device root with the shipped unit (not started), the test
    camera (MJPEG of bikes.mp4 on 127.0.0.1:8554), mosquitto and a recorder of its messages;
    the SSD COCO model at /opt/edged-test/."""
    started = time.monotonic()
    remove_stale_containers()
    scratch = Path(tempfile.mkdtemp(prefix="nspawn-", dir=CACHE))
    overlay = Overlay(device_root.path, scratch)
    container = None
    try:
        prepare_root(overlay.merged, converted_model("ssd_mobilenet_v2_coco"),
                     bikes_jpegs(bikes_clip, 40))
        container = boot(overlay.merged, scratch / "console.log")
        container.systemctl("start", CAMERA_UNIT, RECORDER_UNIT)
        REPORT["container booted"] = f"{time.monotonic() - started:.1f} s"
        yield container
    except SystemTierError as exc:
        pytest.fail(str(exc), pytrace=False)
    finally:
        if container is not None:
            shut_down(container)
        overlay.close()
        shutil.rmtree(scratch, ignore_errors=True)
