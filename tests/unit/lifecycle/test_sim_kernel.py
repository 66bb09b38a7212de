"""The simulated kernel answers sysfs writes as drivers/pci/iov.c and the driver core do."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from agent.errors import SysfsError
from agent.sim.kernel import SimKernel
from agent.sim.node import SimNode, SimPf

PF = "0000:03:00.0"


def _node(root: Path, **pf: object) -> SimNode:
    return SimNode(root, [SimPf(PF, "ens3f0np0", **pf)]).build()  # type: ignore[arg-type]


def _numvfs(node: SimNode) -> str:
    return (node.device_dir(PF) / "sriov_numvfs").read_text().strip()


def _write(kernel: SimKernel, rel: str, value: str) -> None:
    kernel.write(kernel.node.sys / rel, value)


def _errno(kernel: SimKernel, rel: str, value: str) -> int:
    with pytest.raises(SysfsError) as info:
        _write(kernel, rel, value)
    return info.value.errno


def test_numvfs_rules_in_kernel_order(sim_root: Path) -> None:
    node = _node(sim_root, totalvfs=8)
    k = SimKernel(node)
    numvfs = f"bus/pci/devices/{PF}/sriov_numvfs"
    assert _errno(k, numvfs, "four") == errno.EINVAL
    assert _errno(k, numvfs, "9") == errno.ERANGE
    _write(k, numvfs, "4")
    assert _numvfs(node) == "4" and len(list(node.device_dir(PF).glob("virtfn*"))) == 4
    _write(k, numvfs, "4\n")  # equal: success, nothing happens
    assert _errno(k, numvfs, "8") == errno.EBUSY
    assert "4 VFs already enabled. Disable before enabling 8 VFs" in k.kernel_log[-1]
    _write(k, numvfs, "0")
    assert _numvfs(node) == "0" and not list(node.device_dir(PF).glob("virtfn*"))
    assert not (node.sys / "bus/pci/devices/0000:03:00.2").exists()
    _write(k, numvfs, "8")
    assert _numvfs(node) == "8"


def test_numvfs_without_pf_driver_is_enoent_but_equal_count_still_succeeds(sim_root: Path) -> None:
    node = _node(sim_root, driver=None)
    k = SimKernel(node)
    _write(k, f"bus/pci/devices/{PF}/sriov_numvfs", "0")  # n == current is checked first
    assert _errno(k, f"bus/pci/devices/{PF}/sriov_numvfs", "2") == errno.ENOENT


def test_injected_enomem_and_missing_or_readonly_files(sim_root: Path) -> None:
    node = _node(sim_root)
    k = SimKernel(node)
    k.inject(PF, "sriov_numvfs", errno.ENOMEM)
    assert _errno(k, f"bus/pci/devices/{PF}/sriov_numvfs", "2") == errno.ENOMEM
    _write(k, f"bus/pci/devices/{PF}/sriov_numvfs", "2")  # only once
    assert _errno(k, f"bus/pci/devices/{PF}/vendor", "0x1234") == errno.EACCES
    assert _errno(k, f"bus/pci/devices/{PF}/no_such_attr", "1") == errno.ENOENT


def test_autoprobe_off_leaves_vfs_unbound_and_driver_override_binds_them(sim_root: Path) -> None:
    node = _node(sim_root)
    k = SimKernel(node)
    assert _errno(k, f"bus/pci/devices/{PF}/sriov_drivers_autoprobe", "maybe") == errno.EINVAL
    _write(k, f"bus/pci/devices/{PF}/sriov_drivers_autoprobe", "0")
    _write(k, f"bus/pci/devices/{PF}/sriov_numvfs", "2")
    vf = node.vf_address(PF, 0)
    assert not (node.device_dir(vf) / "driver").exists() and not (node.device_dir(vf) / "net").exists()
    # vfio-pci has no ID table: bind without driver_override does not match.
    assert _errno(k, "bus/pci/drivers/vfio-pci/bind", vf) == errno.ENODEV
    _write(k, f"bus/pci/devices/{vf}/driver_override", "vfio-pci\n")
    assert (node.device_dir(vf) / "driver_override").read_text() == "vfio-pci\n"
    _write(k, "bus/pci/drivers_probe", vf)
    assert os.readlink(node.device_dir(vf) / "driver").endswith("/vfio-pci")
    assert not (node.device_dir(vf) / "net").exists()  # no netdev under vfio-pci
    assert _errno(k, "bus/pci/drivers/vfio-pci/bind", vf) == errno.EBUSY
    assert _errno(k, "bus/pci/drivers/mlx5_core/unbind", vf) == errno.ENODEV
    _write(k, "bus/pci/drivers/vfio-pci/unbind", vf)
    _write(k, f"bus/pci/devices/{vf}/driver_override", "\n")  # cleared
    _write(k, "bus/pci/drivers_probe", vf)  # default match: mlx5_core, netdev and RDMA appear
    assert os.readlink(node.device_dir(vf) / "driver").endswith("/mlx5_core")
    assert list((node.device_dir(vf) / "net").iterdir())
    assert list((node.device_dir(vf) / "infiniband").iterdir())
    assert _errno(k, "bus/pci/drivers_probe", "0000:99:00.0") == errno.ENODEV


def test_vfs_appear_late_after_the_write_returns(sim_root: Path) -> None:
    node = _node(sim_root)
    k = SimKernel(node, vf_delay=0.05, probe_delay=0.05)
    _write(k, f"bus/pci/devices/{PF}/sriov_numvfs", "3")
    assert _numvfs(node) == "3"
    assert not list(node.device_dir(PF).glob("virtfn*"))  # not there yet
    k.settle()
    vfs = [node.vf_address(PF, i) for i in range(3)]
    assert all((node.device_dir(v) / "net").exists() for v in vfs)


def test_hung_write_blocks_until_released(sim_root: Path) -> None:
    node = _node(sim_root)
    k = SimKernel(node)
    hang = k.hang_next("sriov_numvfs")
    t = threading.Thread(target=_write, args=(k, f"bus/pci/devices/{PF}/sriov_numvfs", "2"))
    t.start()
    assert hang.entered.wait(5)
    assert t.is_alive() and _numvfs(node) == "0"
    hang.release.set()
    t.join(5)
    assert _numvfs(node) == "2"


def test_reset_is_an_flr_only_for_the_value_1_and_only_where_the_function_has_one(sim_root: Path) -> None:
    node = _node(sim_root, numvfs=2)
    k = SimKernel(node)
    vf = node.vf_address(PF, 0)
    reset = f"bus/pci/devices/{vf}/reset"
    for value in ("1", "1\n", "0x1", "+1"):
        _write(k, reset, value)
    assert k.resets == [vf] * 4
    assert _errno(k, reset, "2") == errno.EINVAL  # reset_store: val != 1
    assert _errno(k, reset, "yes") == errno.EINVAL  # kstrtoul fails
    assert _errno(k, reset, "") == errno.EINVAL
    assert k.resets == [vf] * 4

    other = SimNode(sim_root / "noflr", [SimPf(PF, "ens3f0np0", numvfs=1, vf_flr=False)]).build()
    k2 = SimKernel(other)
    vf2 = other.vf_address(PF, 0)
    assert not (other.device_dir(vf2) / "reset").exists()  # no reset method: no attribute
    assert _errno(k2, f"bus/pci/devices/{vf2}/reset", "1") == errno.ENOENT
    assert k2.resets == []
