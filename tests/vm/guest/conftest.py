"""Guest-side fixtures: these tests run inside the VM (tests/vm/test_vm.py boots it), never on the host."""

from __future__ import annotations

import contextlib
import faulthandler
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from guestlib import (
    NETDEVSIM_BUS,
    NVME_CLASS,
    SYS_PCI,
    pci_function_of,
    read,
    run,
    set_numvfs,
    stitched_node,
    uplink,
    wait_for,
    write_sysfs,
)

# A guest test that hangs would hold the whole VM until the host kills it: after this long, dump every
# thread's stack into the guest log and end the guest's pytest (the host then reports what did not run).
TEST_WATCHDOG_S = 180


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get("VM_RESULTS"):
        raise pytest.UsageError("tests/vm/guest runs inside the test VM only (see tests/vm/test_vm.py)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    faulthandler.dump_traceback_later(TEST_WATCHDOG_S, exit=True)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def nvme_pf() -> Iterator[Path]:
    """The emulated NVMe controller with SR-IOV (QEMU nvme, sriov_max_vfs), with 0 VFs before and after."""
    pfs = [d for d in SYS_PCI.iterdir()
           if (d / "sriov_totalvfs").exists() and read(d / "class") == NVME_CLASS]
    assert len(pfs) == 1, f"expected one SR-IOV NVMe PF, found {pfs}"
    pf = pfs[0].resolve()
    wait_for((pf / "driver").exists, what=f"nvme driver bound to {pf.name}")
    set_numvfs(pf, 0)
    yield pf
    set_numvfs(pf, 0)


_nsim_ids = iter(range(10, 10_000))


@pytest.fixture
def netdevsim() -> Iterator[tuple[Path, str]]:
    """A fresh netdevsim device with one port: (its sysfs dir, the port's netdev name)."""
    dev_id = next(_nsim_ids)
    write_sysfs(NETDEVSIM_BUS / "new_device", f"{dev_id} 1")
    dev = NETDEVSIM_BUS / "devices" / f"netdevsim{dev_id}"
    wait_for(lambda: (dev / "net").exists() and any((dev / "net").iterdir()), what=f"{dev.name} netdev")
    netdev = next((dev / "net").iterdir()).name
    yield dev, netdev
    with contextlib.suppress(OSError):
        write_sysfs(NETDEVSIM_BUS / "del_device", str(dev_id))



RXE = "rxe0"


@pytest.fixture
def rxe() -> Iterator[tuple[str, str]]:
    """Soft-RoCE device rxe0 on the virtio-net interface, link up: (rdma device, netdev)."""
    netdev = uplink()
    assert run("ip", "link", "set", netdev, "up").returncode == 0
    ib = Path("/sys/class/infiniband", RXE)
    if not ib.exists():
        r = run("rdma", "link", "add", RXE, "type", "rxe", "netdev", netdev)
        assert r.returncode == 0, f"rdma link add failed: {r.stderr}"
    wait_for(lambda: read(ib / "ports" / "1" / "state") == "4: ACTIVE", what=f"{RXE} port ACTIVE")
    yield RXE, netdev
    run("ip", "link", "set", netdev, "up")



@pytest.fixture
def roce_node(rxe: tuple[str, str], tmp_path: Path) -> Iterator[tuple[Path, str, list[tuple[str, str]]]]:
    """Soft-RoCE "PF" rxe0 on the virtio-net NIC plus two "VFs": macvlans on it, each with its own rxe.

    Yields (sysfs root for the agent, PF PCI address, [(VF netdev, VF rdma device)]).
    """
    pf_rdma, uplink_dev = rxe
    vfs: list[tuple[str, str]] = []
    for i in (1, 2):
        name = f"mv{i}"
        if not Path("/sys/class/net", name).exists():
            r = run("ip", "link", "add", name, "link", uplink_dev, "type", "macvlan", "mode", "bridge")
            assert r.returncode == 0, r.stderr
        assert run("ip", "link", "set", name, "up").returncode == 0
        rdma = f"rxe{i}"
        if not Path("/sys/class/infiniband", rdma).exists():
            r = run("rdma", "link", "add", rdma, "type", "rxe", "netdev", name)
            assert r.returncode == 0, f"rdma link add {rdma} on {name}: {r.stderr}"
        vfs.append((name, rdma))
    for _, rdma in [(uplink_dev, pf_rdma), *vfs]:
        state = Path("/sys/class/infiniband", rdma, "ports/1/state")
        wait_for(lambda s=state: read(s) == "4: ACTIVE", what=f"{rdma} ACTIVE")
    root = tmp_path / "node"
    template = pci_function_of(uplink_dev)
    pf_addr = template.name
    stitched_node(root, pf_addr, template, (uplink_dev, pf_rdma), list(vfs))
    yield root, pf_addr, vfs
    for name, _ in vfs:
        run("ip", "link", "set", name, "up")
