"""Helpers for the guest-side tests (they run inside the VM, never on the host)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

SYS_PCI = Path("/sys/bus/pci/devices")
NETDEVSIM_BUS = Path("/sys/bus/netdevsim")
NVME_CLASS = "0x010802"


def write_sysfs(path: Path, value: str) -> None:
    """One write(2), so the kernel's errno reaches the caller as OSError (as the agent sees it)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read(path: Path) -> str:
    return path.read_text().strip()


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Kernel work behind a sysfs write or netlink change may complete asynchronously (slow under TCG)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def set_numvfs(pf: Path, n: int) -> None:
    """The kernel's rule: only 0 -> N or N -> 0; so go through 0."""
    if int(read(pf / "sriov_numvfs")) == n:
        return
    if n and int(read(pf / "sriov_numvfs")):
        write_sysfs(pf / "sriov_numvfs", "0")
    write_sysfs(pf / "sriov_numvfs", str(n))



def uplink() -> str:
    """The virtio-net interface (the only ethernet device the VM has that is not netdevsim)."""
    for n in sorted(os.listdir("/sys/class/net")):
        driver = Path("/sys/class/net", n, "device", "driver")
        if driver.exists() and driver.resolve().name == "virtio_net":
            return n
    raise AssertionError("no virtio_net interface in the VM")
