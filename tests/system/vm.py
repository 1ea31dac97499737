"""A real V4L2 camera: Debian's kernel with the vivid driver, booted in QEMU (TCG) from an
initramfs holding the device root (Python, the venv with edged and its wheels, no torch).

This machine's kernel has no modules, so /dev/video0 exists only inside the VM. The kernel
package (``linux-image-amd64``'s current version) is fetched with ``apt-get download`` and
unpacked with ``dpkg-deb -x``; its vmlinuz and the modules vivid needs are cached. The image
(the device root without docs and pip, the modules, a model, a deployment file and the
scenario script) is cached keyed by all of them. The VM has no network; the scenario script
runs as its init's last step and reports on the serial console, which the host reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from system.arm64 import check_host
from system.systemd_container import (
    ARCH,
    CACHE,
    REPORT,
    DeviceRoot,
    SystemTierError,
    check,
    publish_dir,
)

KERNEL_META = f"linux-image-{ARCH}"
QEMU = "qemu-system-x86_64"
HOST_TOOLS = {QEMU: "qemu-system-x86", "cpio": "cpio", "dpkg-deb": "dpkg",
              "apt-get": "apt"}
MODULE = "vivid"
# Folders of the device root the VM does without (it runs edged, not apt or pip).
SKIP = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info", "var/cache",
        "var/lib/apt", "opt/edged/lib/python3.11/site-packages/pip",
        "opt/edged/lib/python3.11/site-packages/setuptools", "proc", "sys", "dev", "run", "tmp")
TEST_DIR = "opt/edged-test"
MARK = "@@edged-vm "  # the scenario's lines on the serial console start with this

# /init: the kernel runs it from the initramfs; the scenario powers the VM off at its end.
_INIT = f"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
depmod -a
exec /opt/edged/bin/python3 /{TEST_DIR}/scenario.py
"""


@dataclass(frozen=True)
class Kernel:
    """A Debian kernel: its ``vmlinuz`` and a modules tree holding what vivid needs."""

    version: str  # the package's kernel release, e.g. 6.1.0-56-amd64
    vmlinuz: Path
    modules: Path  # .../lib/modules/<version>


def kernel_package() -> str:
    """The kernel package the metapackage points at, e.g. ``linux-image-6.1.0-56-amd64``."""
    out = check(["apt-cache", "depends", KERNEL_META], f"apt-cache depends {KERNEL_META}", 60)
    found = re.search(r"Depends: (linux-image-\d\S*)", out)
    if not found:
        raise SystemTierError(f"{KERNEL_META}: no kernel package in apt-cache depends "
                              "(run apt-get update)")
    return found.group(1)


def module_closure(modules: Path, name: str) -> list[Path]:
    """``name``'s .ko and every module it depends on (from each module's ``depends=``)."""
    by_name = {p.stem.replace("-", "_"): p for p in modules.rglob("*.ko")}
    todo, found = [name], []
    while todo:
        module = todo.pop()
        if module in found:
            continue
        if module not in by_name:
            raise SystemTierError(f"kernel module {module} not in {modules}")
        found.append(module)
        depends = re.search(rb"\0depends=([^\0]*)\0", by_name[module].read_bytes())
        if depends:
            todo += [d.replace("-", "_") for d in depends.group(1).decode().split(",") if d]
    return [by_name[m] for m in found]


def fetch_kernel() -> Kernel:
    """Download and unpack the current Debian kernel package once; keep vmlinuz and vivid's
    modules."""
    package = kernel_package()
    version = package.removeprefix("linux-image-")
    final = CACHE / f"kernel-{version}"
    if not final.is_dir():
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=".kernel-", dir=CACHE))
        with tempfile.TemporaryDirectory(prefix="kernel-deb-", dir=CACHE) as work:
            check(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package],
                  f"apt-get download {package}", 900, cwd=work)
            deb = next(Path(work).glob("*.deb"))
            check(["dpkg-deb", "-x", str(deb), f"{work}/x"], f"dpkg-deb -x {deb.name}", 300)
            unpacked = Path(work, "x", "lib", "modules", version)
            shutil.copy2(Path(work, "x", "boot", f"vmlinuz-{version}"), tmp / "vmlinuz")
            for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
                target = tmp / "modules" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(unpacked / name, target)
            for ko in module_closure(unpacked, MODULE):
                target = tmp / "modules" / ko.relative_to(unpacked)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ko, target)
        publish_dir(tmp, final)
        REPORT[f"kernel {version} fetched"] = f"{time.monotonic() - started:.0f} s"
    return Kernel(version, final / "vmlinuz", final / "modules")


def _cpio(directory: Path, names: list[str], out: Any) -> None:
    """Append a newc cpio archive of ``names`` (relative to ``directory``) to ``out``."""
    listing = "".join(f"{n}\n" for n in names)
    proc = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0"],
                          cwd=directory, input=listing.encode(), stdout=out,
                          stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise SystemTierError(f"cpio of {directory} failed: {proc.stderr.decode()[-300:]}")


def _root_names(root: Path) -> list[str]:
    """Every path of the device root except ``SKIP`` (their folders stay, empty)."""
    names = []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        for d in list(dirs):
            if (rel / d).as_posix() in SKIP:
                dirs.remove(d)
                names.append((rel / d).as_posix())
        names += [(rel / n).as_posix() for n in (*dirs, *files)]
    return names


def build_image(root: DeviceRoot, kernel: Kernel, extra: dict[str, bytes]) -> Path:
    """The initramfs: the device root (minus ``SKIP``), vivid's modules and ``extra`` files
    (path in the image -> content; the scenario, a model, a deployment). Cached by all."""
    digest = hashlib.sha256(f"{root.path.name}\0{root.edged_digest}\0{kernel.version}\0{_INIT}"
                            .encode())
    for name in sorted(extra):
        digest.update(name.encode() + b"\0" + hashlib.sha256(extra[name]).digest())
    final = CACHE / f"vm-{digest.hexdigest()[:16]}.cpio"
    if final.is_file():
        return final
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vm-stage-", dir=CACHE) as stage_dir:
        stage = Path(stage_dir)
        modules = stage / "usr/lib/modules" / kernel.version
        shutil.copytree(kernel.modules, modules)
        for name, content in {"init": _INIT.encode(), **extra}.items():
            path = stage / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        (stage / "init").chmod(0o755)
        staged = [p.relative_to(stage).as_posix() for p in sorted(stage.rglob("*"))]
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "wb") as out:
            _cpio(root.path, _root_names(root.path), out)
            # A second archive on top: the kernel unpacks concatenated archives in order.
            _cpio(stage, staged, out)
        tmp.rename(final)
    REPORT["VM image built"] = (f"{time.monotonic() - started:.0f} s, "
                                f"{final.stat().st_size / 2**20:.0f} MB")
    return final


@dataclass
class Boot:
    """What one VM run printed: the scenario's events, edged's output and the console."""

    events: list[dict[str, Any]]
    console: str
    seconds: float

    def named(self, event: str) -> list[dict[str, Any]]:
        """The events called ``event``, in order."""
        return [e for e in self.events if e["event"] == event]


@dataclass(frozen=True)
class VMImage:
    """A bootable kernel + initramfs pair."""

    kernel: Kernel
    initrd: Path

    def boot(self, timeout: float = 420, memory_mb: int = 3072) -> Boot:
        """Boot under QEMU with TCG (no KVM), no network, the serial console on stdout; run
        until the scenario powers the VM off. Returns the events the scenario printed."""
        started = time.monotonic()
        cmd = [QEMU, "-accel", "tcg", "-cpu", "max", "-smp", str(min(os.cpu_count() or 1, 2)),
               "-m", str(memory_mb), "-nic", "none", "-display", "none", "-monitor", "none",
               "-serial", "stdio", "-no-reboot", "-kernel", str(self.kernel.vmlinuz),
               "-initrd", str(self.initrd),
               "-append", "console=ttyS0 rdinit=/init quiet loglevel=3 panic=-1"]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode(errors="replace")
            pytest.fail(f"VM: no power-off within {timeout:g} s; console tail:\n"
                        f"{out[-3000:]}", pytrace=False)
        console = proc.stdout.decode(errors="replace").replace("\r", "")
        if proc.returncode != 0:
            pytest.fail(f"{QEMU} exited with {proc.returncode}: "
                        f"{proc.stderr.decode(errors='replace')[-500:]}", pytrace=False)
        events = [json.loads(line[line.index(MARK) + len(MARK):])
                  for line in console.splitlines() if MARK in line]
        return Boot(events, console, time.monotonic() - started)


@pytest.fixture(scope="session")
def vm_kernel(device_root: DeviceRoot) -> Kernel:
    """The cached Debian kernel with vivid's modules."""
    try:
        check_host(HOST_TOOLS, SystemTierError)
        return fetch_kernel()
    except SystemTierError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def make_vm_image(device_root: DeviceRoot, vm_kernel: Kernel) -> Iterator[Any]:
    """``make_vm_image(extra) -> VMImage``: the device root as an initramfs plus ``extra``
    files (image path -> bytes); it must hold ``opt/edged-test/scenario.py``."""

    def make(extra: dict[str, bytes]) -> VMImage:
        try:
            return VMImage(vm_kernel, build_image(device_root, vm_kernel, extra))
        except SystemTierError as exc:
            pytest.fail(str(exc), pytrace=False)

    yield make
