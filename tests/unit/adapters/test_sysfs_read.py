"""SysfsHost reads the kernel's file formats; errors carry path and errno."""

from __future__ import annotations

import errno
import os

import pytest

from agent.adapters.sysfs import FileWriter, SysfsHost
from agent.errors import SysfsError
from agent.sim.node import SimNode


def test_rdma_device_read_by_class_name_finds_its_char_devices(sim_node: SimNode) -> None:
    name = sim_node.rdma_name("0002:01:00.2")
    n = name.removeprefix("mlx5_")
    rdma = SysfsHost(sim_node.root).read_rdma(name)
    assert rdma is not None
    assert (rdma.uverbs, rdma.umad, rdma.issm) == (f"uverbs{n}", (f"umad{n}",), (f"issm{n}",))
    port = rdma.ports[0]
    assert (port.number, port.state, port.state_name, port.phys_state, port.phys_state_name) == (
        1, 4, "ACTIVE", 5, "LinkUp")
    assert (port.link_layer, port.rate) == ("Ethernet", "200 Gb/sec (4X HDR)")
    assert rdma.node_guid.count(":") == 3
    assert SysfsHost(sim_node.root).read_rdma("mlx5_99") is None


def test_link_down_reads_as_no_carrier_unknown_speed_and_port_down(sim_node: SimNode) -> None:
    sim_node.set_pf_link("enP2p1s0f0np0", up=False)
    host = SysfsHost(sim_node.root)
    nd = host.read_netdev("enP2p1s0f0np0")
    assert nd is not None and (nd.operstate, nd.carrier, nd.speed_mbps) == ("down", False, None)
    pf = host.read_pf("0002:01:00.0", with_vfs=False)
    assert pf.vfs == () and pf.rdma is not None and not pf.rdma.all_ports_active
    assert pf.rdma.ports[0].state_name == "DOWN"


def test_netdev_owner_is_the_pci_function_or_none(sim_node: SimNode) -> None:
    host = SysfsHost(sim_node.root)
    assert host.netdev_pci_address("enP2p1s0f0np0") == "0002:01:00.0"
    assert host.netdev_pci_address("enP2p1s0f0v1") == "0002:01:00.3"
    virtual = sim_node.root / "sys/devices/virtual/net/lo"
    virtual.mkdir(parents=True)
    os.symlink("../../devices/virtual/net/lo", sim_node.root / "sys/class/net/lo")
    assert host.netdev_pci_address("lo") is None  # no device link: not a PCI function
    assert host.netdev_pci_address("nope0") is None


def test_listing_marks_vfs_with_their_pf(sim_node: SimNode) -> None:
    by_addr = {d.pci_address: d for d in SysfsHost(sim_node.root).list_pci()}
    assert by_addr["0002:01:00.0"].physfn is None and by_addr["0002:01:00.0"].netdevs == ("enP2p1s0f0np0",)
    assert by_addr["0002:01:00.2"].physfn == "0002:01:00.0" and by_addr["0002:01:00.2"].device == "101e"
    assert len(by_addr) == 8  # 4 PFs + 4 VFs


def test_missing_pf_raises_with_path_and_errno(sim_node: SimNode) -> None:
    with pytest.raises(SysfsError) as err:
        SysfsHost(sim_node.root).read_pf("0009:00:00.0")
    assert err.value.errno == errno.ENOENT and err.value.path.endswith("bus/pci/devices/0009:00:00.0")


def test_file_writer_errors_name_the_path(sim_node: SimNode) -> None:
    target = sim_node.root / "sys/bus/pci/drivers_probe"
    FileWriter().write(target, "0002:01:00.2")
    assert target.read_text() == "0002:01:00.2"
    with pytest.raises(SysfsError) as err:
        FileWriter().write(sim_node.root / "sys/no/such/attr", "1")
    assert err.value.errno == errno.ENOENT and "sys/no/such/attr" in str(err.value)


def test_dev_paths_are_checked_under_dev_root(sim_node: SimNode) -> None:
    host = SysfsHost(sim_node.root)
    assert host.dev_path_exists("/dev/infiniband/rdma_cm")
    assert not host.dev_path_exists("/dev/infiniband/uverbs99")
    elsewhere = SysfsHost(sim_node.root, dev_root=sim_node.root / "sys")
    assert not elsewhere.dev_path_exists("/dev/infiniband/rdma_cm")
