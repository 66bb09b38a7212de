"""Helpers for the guest-side tests (they run inside the VM, never on the host)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pyroute2 import IPRoute

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


def pci_function_of(netdev: str) -> Path:
    """The PCI function a netdev sits on (virtio-net: the PCI parent of its virtioN device)."""
    d = Path("/sys/class/net", netdev, "device").resolve()
    while d.parent != d and (d / "subsystem").resolve().name != "pci":
        d = d.parent
    return d


def stitched_node(root: Path, pf_addr: str, template: Path, pf: tuple[str, str | None],
                  vfs: list[tuple[str | None, str | None]], *, numvfs_from: Path | None = None) -> None:
    """A sysfs root holding one PF at ``pf_addr`` with ``pf`` = (netdev, rdma) and ``vfs`` [(netdev, rdma)].

    No emulated NIC in QEMU 7.2 has SR-IOV with netdevs, so the PCI parent/child links (virtfnN,
    physfn, driver) are drawn here; everything else stays the real kernel's: net/<netdev> and
    infiniband/<rdma> link to the live /sys objects, /sys/class/{net,infiniband,infiniband_verbs} are
    the real ones, netlink events and VF settings go to the real links, and ``numvfs_from`` (netdevsim's
    sriov_numvfs) stands behind the PF's sriov_numvfs. vendor/device/class/driver come from ``template``,
    a real PCI function.
    """
    sys_root = root / "sys"
    (sys_root / "class").mkdir(parents=True)
    for cls in ("net", "infiniband", "infiniband_verbs"):
        (sys_root / "class" / cls).symlink_to(f"/sys/class/{cls}")
    devices = sys_root / "bus/pci/devices"
    devices.mkdir(parents=True)
    driver = (template / "driver").resolve()

    def function(addr: str, netdev: str | None, rdma: str | None) -> Path:
        d = devices / addr
        d.mkdir()
        for attr in ("vendor", "device", "class", "numa_node"):
            (d / attr).write_text((template / attr).read_text())
        (d / "driver").symlink_to(driver)
        if netdev is not None:
            (d / "net").mkdir()
            (d / "net" / netdev).symlink_to(Path("/sys/class/net", netdev).resolve())
        if rdma is not None:
            (d / "infiniband").mkdir()
            (d / "infiniband" / rdma).symlink_to(Path("/sys/class/infiniband", rdma).resolve())
        return d

    pf_dir = function(pf_addr, *pf)
    (pf_dir / "sriov_totalvfs").write_text(f"{len(vfs)}\n")
    if numvfs_from is not None:
        (pf_dir / "sriov_numvfs").symlink_to(numvfs_from)
    else:
        (pf_dir / "sriov_numvfs").write_text(f"{len(vfs)}\n")
    domain_bus_dev = pf_addr.rsplit(".", 1)[0]
    for i, (netdev, rdma) in enumerate(vfs):
        addr = f"{domain_bus_dev}.{i + 1}"
        vf = function(addr, netdev, rdma)
        (vf / "physfn").symlink_to(f"../{pf_addr}")
        (pf_dir / f"virtfn{i}").symlink_to(f"../{addr}")


def vf_info(ipr: IPRoute, ifname: str) -> list[dict[str, object]]:
    """IFLA_VFINFO_LIST of a PF netdev (asked for with RTEXT_FILTER_VF), one flat dict per VF."""
    (msg,) = ipr.link("get", ifname=ifname, ext_mask=1)
    vflist = msg.get_attr("IFLA_VFINFO_LIST")
    if vflist is None:
        return []
    out = []
    for info in vflist.get_attrs("IFLA_VF_INFO"):
        rate = info.get_attr("IFLA_VF_RATE")
        out.append({
            "vf": info.get_attr("IFLA_VF_MAC")["vf"],
            "mac": info.get_attr("IFLA_VF_MAC")["mac"],
            "vlan": info.get_attr("IFLA_VF_VLAN")["vlan"],
            "qos": info.get_attr("IFLA_VF_VLAN")["qos"],
            "spoofchk": info.get_attr("IFLA_VF_SPOOFCHK")["spoofchk"],
            "trust": info.get_attr("IFLA_VF_TRUST")["trust"],
            "link_state": info.get_attr("IFLA_VF_LINK_STATE")["link_state"],
            "max_tx_rate": rate["max_tx_rate"],
            "min_tx_rate": rate["min_tx_rate"],
        })
    return out
