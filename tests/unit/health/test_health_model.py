"""The pure health function over what sysfs and netlink last said, on a simulated mlx5 node."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from agent.adapters.sysfs import SysfsHost
from agent.config import parse_config
from agent.core.health import LinkObservation, link_matters, vf_health, with_links
from agent.core.inventory import build_view
from agent.model import Health, NetdevInfo, PfInfo, VfInfo
from agent.sim.node import SimNode, dgx_spark

PF = "0002:01:00.0"
PF_NAME = "enP2p1s0f0np0"
PFS = f"pfs: [{{pfName: {PF_NAME}, numVfs: 2}}]"
CONFIG = parse_config(f"resources: [{{resourceName: nvidia.com/cx7_qsfp, {PFS}}}]")
NO_RDMA = parse_config(f"resources: [{{resourceName: nvidia.com/cx7_eth, rdma: false, {PFS}}}]")


@pytest.fixture
def node(tmp_path: Path) -> SimNode:
    return dgx_spark(tmp_path, numvfs=2)


def read(node: SimNode) -> PfInfo:
    return SysfsHost(node.root).read_pf(PF)


def health_of(pf: PfInfo, rdma: bool = True,
              in_pod: frozenset[str] = frozenset()) -> dict[str, tuple[str, str]]:
    resource = (CONFIG if rdma else NO_RDMA).resources[0]
    view = build_view(resource, [pf], in_pod, lambda _: False)  # the netdevice kind checks no /dev node
    return {d.id: (d.health.value, d.reason) for d in view.devices}


def test_all_healthy_when_link_and_rdma_ports_are_up(node: SimNode) -> None:
    assert health_of(read(node)) == {"0002:01:00.2": ("Healthy", ""), "0002:01:00.3": ("Healthy", "")}


def test_pf_cable_pull_makes_every_vf_unhealthy_and_recovers(node: SimNode) -> None:
    node.set_pf_link(PF_NAME, up=False)
    down = health_of(read(node))
    assert {h for h, _ in down.values()} == {"Unhealthy"}
    assert down["0002:01:00.2"][1] == f"PF {PF_NAME} has no carrier"
    node.set_pf_link(PF_NAME, up=True)
    assert {h for h, _ in health_of(read(node)).values()} == {"Healthy"}


def test_rdma_port_not_active_only_matters_when_the_resource_needs_rdma(node: SimNode) -> None:
    node.set_rdma_port(node.rdma_name(PF), up=False)
    pf = read(node)
    reason = f"PF RDMA device {node.rdma_name(PF)} port not ACTIVE (1: DOWN)"
    assert health_of(pf)["0002:01:00.2"] == ("Unhealthy", reason)
    assert health_of(pf, rdma=False)["0002:01:00.2"] == ("Healthy", "")


def test_driver_unbound_vf_is_unhealthy(node: SimNode) -> None:
    node.unprobe("0002:01:00.3")
    got = health_of(read(node))
    assert got["0002:01:00.3"] == ("Unhealthy", "VF has no driver bound")
    assert got["0002:01:00.2"] == ("Healthy", "")


def test_vf_pci_function_gone_but_still_linked_by_the_pf(node: SimNode) -> None:
    """`echo 1 > .../<vf>/remove` leaves the PF's virtfnN link pointing at nothing."""
    vf = "0002:01:00.3"
    node.unprobe(vf)
    target = node.device_dir(vf)
    for child in target.iterdir():
        child.unlink()
    target.rmdir()
    os.unlink(node.sys / "bus/pci/devices" / vf)
    assert health_of(read(node))[vf] == ("Unhealthy", "VF PCI device is gone")


def test_missing_rdma_device_is_unhealthy_unless_the_vf_is_in_a_pod(node: SimNode) -> None:
    vf = "0002:01:00.2"
    pf = read(node)
    vfs = tuple(v if v.pci_address != vf else replace(v, rdma=None, netdev=None) for v in pf.vfs)
    no_rdma = replace(pf, vfs=vfs)
    assert health_of(no_rdma)[vf] == ("Unhealthy", "VF has no RDMA device")
    assert health_of(no_rdma, in_pod=frozenset({vf}))[vf] == ("Healthy", "")


def test_vf_netdev_moved_into_a_pod_is_not_unhealthy(node: SimNode) -> None:
    node.move_netdev_to_pod(node.vf_netdev_name(PF, 0))
    pf = read(node)
    assert pf.vfs[0].netdev is None
    assert health_of(pf, in_pod=frozenset({"0002:01:00.2"}))["0002:01:00.2"] == ("Healthy", "")


def test_netlink_link_state_overrides_the_sysfs_read(node: SimNode) -> None:
    pf = read(node)
    assert pf.netdev is not None
    down = {PF_NAME: LinkObservation(PF_NAME, pf.netdev.ifindex, admin_up=True, carrier=False,
                                     operstate="lowerlayerdown")}
    over = with_links(pf, down)
    assert over.netdev is not None and over.netdev.carrier is False
    assert over.netdev.operstate == "lowerlayerdown"
    assert over.netdev.mtu == pf.netdev.mtu  # the rest still comes from sysfs
    assert health_of(over)["0002:01:00.2"] == ("Unhealthy", f"PF {PF_NAME} has no carrier")

    admin_down = {PF_NAME: LinkObservation(PF_NAME, 9, admin_up=False, carrier=False, operstate="down")}
    got = health_of(with_links(pf, admin_down))["0002:01:00.2"]
    assert got == ("Unhealthy", f"PF {PF_NAME} is admin-down")

    up = {PF_NAME: LinkObservation(PF_NAME, 9, admin_up=True, carrier=True, operstate="up")}
    assert health_of(with_links(pf, up))["0002:01:00.2"] == ("Healthy", "")


def test_unobserved_links_keep_the_sysfs_state(node: SimNode) -> None:
    node.set_pf_link(PF_NAME, up=False)
    pf = read(node)
    other = {"eth0": LinkObservation("eth0", 2, admin_up=True, carrier=True, operstate="up")}
    assert with_links(pf, other) == pf


def test_vf_health_checks_driver_before_link() -> None:
    """The first reason reported is the most fundamental one."""
    pf = PfInfo(PF, "15b3", "1021", "mlx5_core", NetdevInfo(PF_NAME, "down", False, 1500, 5), 0, 8, 1)
    vf = VfInfo("0002:01:00.2", 0, PF, "15b3", "101e", driver=None)
    assert vf_health(pf, vf, rdma_required=True) == (Health.UNHEALTHY, "VF has no driver bound")


def test_pod_veths_do_not_matter_but_pci_netdevs_and_watched_names_do() -> None:
    veth = LinkObservation("veth1234", 40, True, True, "up")
    veth_down = LinkObservation("veth1234", 40, False, False, "down")
    assert not link_matters(veth, veth_down, {PF_NAME})
    assert not link_matters(None, veth, {PF_NAME})
    vf = LinkObservation("enP2p1s0f0v0", 41, True, True, "up", parent_bus="pci")
    assert link_matters(None, vf, set())
    pf_up = LinkObservation(PF_NAME, 5, True, True, "up")
    assert link_matters(pf_up, LinkObservation(PF_NAME, 5, True, False, "down"), {PF_NAME})
    assert not link_matters(pf_up, pf_up, {PF_NAME})
    renamed = LinkObservation("eth7", 5, True, True, "up")
    assert link_matters(pf_up, renamed, {PF_NAME})  # renamed away from a watched name
