"""aarch64 system tier: a Debian bookworm arm64 root run under qemu-user emulation.

The root (debootstrap minbase + Python 3.11 + a venv holding edged's runtime dependencies as
aarch64 wheels, never torch) is built once and cached under ``$EDGED_SYSTEM_CACHE`` (default
/var/cache/edged-system-tests), keyed by everything that went into it. Each session installs a
wheel built from the checkout into that venv (skipped when the same sources are installed).

Commands run in a private mount namespace (``unshare -m``), so nothing stays mounted: /proc with
a Cortex-A72 /proc/cpuinfo bound over it (onnxruntime's aarch64 build crashes at import when it
reads the host's x86 cpuinfo), /dev, /sys, a fresh /tmp and the caller's folders, then chroot.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("EDGED_SYSTEM_CACHE", "/var/cache/edged-system-tests")) / "arm64"
SUITE = "bookworm"
ROOT_PACKAGES = ("python3", "python3-venv")
VENV = "/opt/edged"  # the device install inside the root
PLATFORM = "manylinux_2_28_aarch64"  # bookworm has glibc 2.36
RECIPE = "1"  # bump when the build steps change in a way the cache keys cannot see
QEMU_CPU = "cortex-a72"
HOST_TOOLS = {"debootstrap": "debootstrap", "qemu-aarch64-static": "qemu-user-static",
              "update-binfmts": "binfmt-support", "unshare": "util-linux", "chroot": "coreutils"}
GUEST_PATH = f"{VENV}/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"

# A Raspberry Pi 4's CPU as its kernel lists it, one block per core.
_CPUINFO_CORE = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

"""

# Runs as root in the new mount namespace. $1 the root, $2 the cpuinfo file, $3 the number of
# (host dir, guest dir) pairs that follow, then the command to run inside the root.
_ENTER = r"""set -e
root=$1 cpuinfo=$2 n=$3; shift 3
mount -t proc proc "$root/proc"
mount --bind "$cpuinfo" "$root/proc/cpuinfo"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
mount -t tmpfs tmpfs "$root/tmp"
while [ "$n" -gt 0 ]; do
    mkdir -p "$root$2"
    mount --bind "$1" "$root$2"
    shift 2; n=$((n - 1))
done
exec chroot "$root" "$@"
"""

# Figures for the terminal summary (build times, footprint, RSS), in the order measured.
REPORT: dict[str, str] = {}


class Arm64Error(Exception):
    """A prerequisite of the aarch64 tier is missing or a build step failed (one line)."""


def _digest(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _last_lines(text: str, n: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-n:])


def _peak_rss(pid: int, done: threading.Event, peak: list[float]) -> None:
    """Poll the kernel's high-water mark of ``pid``'s resident memory until ``done``. Read per
    process image (VmHWM), unlike ``ru_maxrss`` which also counts the forked test runner."""
    status = Path(f"/proc/{pid}/status")
    while not done.wait(0.05):
        try:
            match = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.M)
        except OSError:
            return
        if match:
            peak[0] = max(peak[0], int(match.group(1)) / 1024)


def run_measured(cmd: Sequence[str], what: str, timeout: float,
                 env: Mapping[str, str] | None = None) -> tuple[str, float]:
    """Run a host command; its stdout and its peak RSS in MB (of the last program it became:
    ``unshare sh chroot env python`` all exec in one process). A failure becomes one
    ``Arm64Error`` line with its last output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env)
        done, peak = threading.Event(), [0.0]
        poller = threading.Thread(target=_peak_rss, args=(proc.pid, done, peak), daemon=True)
        poller.start()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise Arm64Error(f"{what}: no result after {timeout:.0f} s") from None
        finally:
            done.set()
            poller.join()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise Arm64Error(f"{what} failed (exit {proc.returncode}): "
                         f"{_last_lines(stderr or stdout)}")
    return stdout, peak[0]


def _check(cmd: Sequence[str], what: str, timeout: float,
           env: Mapping[str, str] | None = None) -> str:
    """``run_measured`` for its stdout only."""
    return run_measured(cmd, what, timeout, env)[0]


def check_host(tools: Mapping[str, str], error: type[Exception] = Arm64Error) -> None:
    """Root and every host command in ``tools`` (command -> Debian package), or one ``error``
    line naming the packages to install (shared by every part of the system tier)."""
    if os.geteuid() != 0:
        raise error("the system tier needs root (debootstrap, mount namespaces, nspawn, QEMU)")
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    if missing:
        raise error(f"the system tier needs the Debian packages {' '.join(missing)} "
                    "(./dev test installs them)")


def ensure_binfmt() -> None:
    """Have the kernel run aarch64 binaries through qemu-aarch64-static. The F flag opens the
    interpreter at registration, so it also runs inside a chroot that lacks it."""
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        _check(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)],
               "mounting binfmt_misc", 30)
    entry = binfmt / "qemu-aarch64"
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        _check(["update-binfmts", "--enable", "qemu-aarch64"], "update-binfmts", 30)
    if not entry.exists() or not re.search(r"^flags: \w*F", entry.read_text(), re.M):
        raise Arm64Error(f"{entry}: qemu-aarch64 is not registered with the F flag "
                         "(reinstall qemu-user-static and binfmt-support)")


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (one-line or deb822 sources), so debootstrap
    reaches the same server."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        text = path.read_text() if path.is_file() else ""
        if not re.search(rf"\b{SUITE}\b", text):
            continue
        uris = re.findall(r"^\s*URIs:\s*(\S+)", text, re.M)
        uris += re.findall(rf"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", text, re.M)
        for uri in uris:
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return "http://deb.debian.org/debian"


def runtime_dependencies() -> list[str]:
    """The names of pyproject's runtime dependencies (``[project] dependencies``)."""
    with open(REPO / "pyproject.toml", "rb") as f:
        requirements = tomllib.load(f)["project"]["dependencies"]
    return [re.match(r"[A-Za-z0-9._-]+", req).group(0) for req in requirements]


def runtime_pins() -> list[str]:
    """``name==version`` of the runtime dependencies as installed on the host, so both sides
    run the same ONNX Runtime, OpenCV and numpy releases."""
    try:
        return [f"{name}=={importlib.metadata.version(name)}" for name in runtime_dependencies()]
    except importlib.metadata.PackageNotFoundError as exc:
        raise Arm64Error(f"the host venv lacks the runtime dependency {exc.name}") from None


def project_files() -> list[Path]:
    """The checkout files a wheel is built from (sources only, no caches)."""
    files = [REPO / "pyproject.toml", REPO / "README.md"]
    for package in ("edged", "models"):
        files += sorted(p for p in (REPO / package).rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts)
    return files


def cpuinfo_file() -> Path:
    """A Cortex-A72 /proc/cpuinfo with as many cores as the host has."""
    cores = os.cpu_count() or 1
    path = CACHE / f"cpuinfo-{QEMU_CPU}-{cores}"
    if not path.exists():
        path.write_text("".join(_CPUINFO_CORE.format(n=n) for n in range(cores)))
    return path


@dataclass(frozen=True)
class Arm64Root:
    """A Debian arm64 root and the way to run commands in it."""

    path: Path
    cpuinfo: Path

    def command(self, argv: Sequence[str], binds: Mapping[Path, str] | None = None) -> list[str]:
        """The host command line that runs ``argv`` in the root, with host folders ``binds``
        mounted at the given guest paths."""
        pairs = [str(p) for host, guest in (binds or {}).items() for p in (host, guest)]
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _ENTER,
                "enter", str(self.path), str(self.cpuinfo), str(len(pairs) // 2), *pairs,
                "/usr/bin/env", "-i", f"PATH={GUEST_PATH}", "HOME=/root", "LANG=C.UTF-8",
                f"QEMU_CPU={QEMU_CPU}", "PIP_DISABLE_PIP_VERSION_CHECK=1", *argv]

    def run(self, argv: Sequence[str], binds: Mapping[Path, str] | None = None,
            timeout: float = 600, what: str | None = None) -> str:
        """Run ``argv`` in the root; its stdout, or one ``Arm64Error`` line on failure."""
        return self.run_measured(argv, binds, timeout, what)[0]

    def run_measured(self, argv: Sequence[str], binds: Mapping[Path, str] | None = None,
                     timeout: float = 600, what: str | None = None) -> tuple[str, float]:
        """``run`` that also returns the peak RSS in MB (under qemu-user: the emulator's
        process, guest memory and translated code included)."""
        return run_measured(self.command(argv, binds), what or f"arm64: {' '.join(argv)[:80]}",
                            timeout, env={"PATH": os.environ.get("PATH", ""),
                                          "QEMU_CPU": QEMU_CPU})


def _remove(path: Path) -> None:
    """Delete a cached build, never through a mount left inside it."""
    if f" {path}/" in Path("/proc/self/mountinfo").read_text():
        raise Arm64Error(f"{path}: something is still mounted in it; unmount it, then delete "
                         "the folder")
    shutil.rmtree(path)


def remove_stale_builds(keep: Sequence[Path] = ()) -> None:
    """Delete what interrupted builds left and, given ``keep``, every other cached root and
    wheel set (the caller holds the cache lock)."""
    stale = [*CACHE.glob(".root-*"), *CACHE.glob(".wheels-*")]
    if keep:
        stale += [p for p in [*CACHE.glob("root-*"), *CACHE.glob("wheels-*")] if p not in keep]
    for path in stale:
        _remove(path)


def _publish_dir(tmp: Path, final: Path) -> Path:
    """Move a finished build into place (a crash mid-build never leaves a half-built cache)."""
    tmp.rename(final)
    return final


def download_wheels(pins: list[str]) -> Path:
    """The aarch64 wheels of the runtime dependencies (and theirs), downloaded on the host:
    pip inside the root has no CA bundle, so the root installs them with ``--no-index``."""
    final = CACHE / f"wheels-{_digest(RECIPE, PLATFORM, *pins)}"
    if final.is_dir():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".wheels-", dir=CACHE))
    _check([sys.executable, "-m", "pip", "download", "-q", "-d", str(tmp), "--platform", PLATFORM,
            "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", *pins],
           f"downloading aarch64 wheels ({' '.join(pins)})", 900)
    return _publish_dir(tmp, final)


def build_root(mirror: str, pins: list[str], wheels: Path, cpuinfo: Path) -> Arm64Root:
    """debootstrap a minbase bookworm arm64 root with Python, then a venv in it holding the
    runtime dependencies (no edged yet: that changes with every checkout)."""
    final = CACHE / f"root-{_digest(RECIPE, SUITE, mirror, *ROOT_PACKAGES, *pins)}"
    if final.is_dir():
        return Arm64Root(final, cpuinfo)
    tmp = Path(tempfile.mkdtemp(prefix=".root-", dir=CACHE))
    started = time.monotonic()
    tmp.chmod(0o755)
    # In its own mount namespace: the /proc and /sys debootstrap mounts in the root go with it.
    _check(["unshare", "--mount", "--propagation", "private", "--",
            "debootstrap", "--arch=arm64", "--variant=minbase",
            f"--include={','.join(ROOT_PACKAGES)}", SUITE, str(tmp), mirror],
           f"debootstrap {SUITE} arm64 from {mirror}", 3600)
    shutil.rmtree(tmp / "var/cache/apt/archives", ignore_errors=True)
    (tmp / "var/cache/apt/archives/partial").mkdir(parents=True)
    root = Arm64Root(tmp, cpuinfo)
    root.run(["python3", "-m", "venv", VENV], what="python3 -m venv in the arm64 root")
    root.run([f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links", "/mnt/wheels",
              *pins], binds={wheels: "/mnt/wheels"}, timeout=1800,
             what="installing the runtime wheels in the arm64 root")
    REPORT["arm64 root built (debootstrap + venv)"] = f"{time.monotonic() - started:.0f} s"
    return Arm64Root(_publish_dir(tmp, final), cpuinfo)


def install_project(root: Arm64Root, wheels: Path) -> None:
    """Build a wheel from the checkout and install it into the root's venv without the convert
    extra (no torch); skipped when these exact sources are installed already."""
    files = project_files()
    digest = _digest(*(f"{p.relative_to(REPO)}" for p in files),
                     *(p.read_bytes() for p in files))
    stamp = root.path / VENV.lstrip("/") / ".edged-sources"
    if stamp.is_file() and stamp.read_text() == digest:
        return
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edged-wheel-") as work:
        # Built from a copy: building in the checkout would leave build/ and egg-info there.
        source, dist = Path(work, "src"), Path(work, "dist")
        for path in files:
            target = source / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        _check([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                "-w", str(dist), str(source)], "building the edged wheel", 300)
        wheel = next(dist.glob("edged-*.whl"))
        root.run([f"{VENV}/bin/pip", "uninstall", "-q", "-y", "edged"], timeout=300,
                 what="removing the previous edged from the arm64 root")
        root.run([f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links",
                  "/mnt/wheels", f"/mnt/dist/{wheel.name}"],
                 binds={wheels: "/mnt/wheels", dist: "/mnt/dist"}, timeout=900,
                 what="installing the edged wheel in the arm64 root")
    stamp.write_text(digest)
    REPORT["edged wheel installed in the arm64 root"] = f"{time.monotonic() - started:.0f} s"


@pytest.fixture(scope="session")
def arm64_root() -> Iterator[Arm64Root]:
    """The cached Debian bookworm arm64 root with edged installed from this checkout.

    The cache is locked for the session: a concurrent run on the same machine waits rather than
    reinstalling edged under a running test.
    """
    started = time.monotonic()
    try:
        check_host(HOST_TOOLS)
        CACHE.mkdir(parents=True, exist_ok=True)
        ensure_binfmt()
        with open(CACHE / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            remove_stale_builds()
            pins = runtime_pins()
            wheels = download_wheels(pins)
            root = build_root(debian_mirror(), pins, wheels, cpuinfo_file())
            remove_stale_builds(keep=(root.path, wheels))
            install_project(root, wheels)
            REPORT["arm64 root ready"] = f"{time.monotonic() - started:.0f} s ({root.path})"
            yield root
    except Arm64Error as exc:
        pytest.fail(str(exc), pytrace=False)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The tier's figures (build times, device footprint, daemon RSS) after the test run."""
    if REPORT:
        terminalreporter.section("aarch64 tier (qemu-user)")
        for key, value in REPORT.items():
            terminalreporter.write_line(f"{key}: {value}")
