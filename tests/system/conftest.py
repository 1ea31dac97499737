"""System tier fixtures: each part of the tier keeps its own in a module of this folder."""

# --- aarch64 tier (qemu-user): tests/system/arm64.py ---
from system.arm64 import arm64_root, pytest_terminal_summary  # noqa: F401

# --- end aarch64 tier ---
# --- systemd + V4L2 tier: tests/system/systemd_container.py, tests/system/vm.py ---
from system.systemd_container import device_root, systemd_container  # noqa: F401, E402
from system.vm import make_vm_image, vm_kernel  # noqa: F401, E402
# --- end systemd + V4L2 tier ---
