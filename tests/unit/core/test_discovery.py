"""Discovery over simulated mlx5 sysfs trees: which PFs a config selects and what each VF looks like."""

from __future__ import annotations

from pathlib import Path

from agent.adapters.sysfs import SysfsHost
from agent.app import App, build_agent
from agent.config import parse_config
from agent.core.discovery import resolve_pfs
from agent.core.inventory import build_view
from agent.model import Health, PciDevice
from agent.sim.node import CX7_PF_DEVICE, MLX_VENDOR, SimNode, SimPf, dgx_spark
from tests.conftest import node_settings


def _agent(node: SimNode, config: str) -> App:
    return build_agent(node_settings(node.root), parse_config(config))


def _one_pf(config_pf: str, numvfs: int = 4) -> str:
    return (f"resources:\n  - resourceName: nvidia.com/cx7_qsfp\n    pfs:\n"
            f"      - {config_pf}\n        numVfs: {numvfs}\n")


def _view(agent: App, resource: str = "nvidia.com/cx7_qsfp") -> dict[str, tuple[Health, str, int]]:
    res, node = agent.inventory.scan()
    res_cfg = next(r for r in agent.resources.config.resources if r.resource_name == resource)
    pfs = [node.pfs[m.pci_address] for m in res.for_resource(resource) if m.pci_address in node.pfs]
    view = build_view(res_cfg, pfs, agent.ledger.held(), agent.sysfs.dev_path_exists)
    return {d.id: (d.health, d.reason, d.numa_node) for d in view.devices}


def test_vfs_are_read_with_driver_netdev_rdma_and_uverbs(sim_node: SimNode) -> None:
    host = SysfsHost(sim_node.root)
    pf = host.read_pf("0002:01:00.0")
    assert (pf.vendor, pf.device, pf.driver) == (MLX_VENDOR, CX7_PF_DEVICE, "mlx5_core")
    assert (pf.sriov_totalvfs, pf.sriov_numvfs, pf.sriov_drivers_autoprobe) == (8, 4, True)
    assert pf.netdev is not None and pf.netdev.name == "enP2p1s0f0np0" and pf.netdev.carrier is True
    assert [v.pci_address for v in pf.vfs] == ["0002:01:00.2", "0002:01:00.3", "0002:01:00.4", "0002:01:00.5"]
    vf = pf.vfs[0]
    assert (vf.index, vf.pf_pci_address, vf.device, vf.driver) == (0, "0002:01:00.0", "101e", "mlx5_core")
    assert vf.netdev is not None and vf.netdev.name == "enP2p1s0f0v0"
    assert vf.rdma is not None and vf.rdma.name == sim_node.rdma_name("0002:01:00.2")
    assert vf.rdma.uverbs is not None and vf.rdma.uverbs.startswith("uverbs")
    assert vf.rdma.all_ports_active


def test_vf_moved_into_a_pod_has_no_netdev_and_is_still_listed(sim_node: SimNode) -> None:
    sim_node.move_netdev_to_pod("enP2p1s0f0v1")
    pf = SysfsHost(sim_node.root).read_pf("0002:01:00.0")
    vf = next(v for v in pf.vfs if v.pci_address == "0002:01:00.3")
    assert vf.netdev is None
    assert vf.driver == "mlx5_core"
    view = _view(_agent(sim_node, _one_pf("pfName: enP2p1s0f0np0")))
    assert view["0002:01:00.3"][0] is Health.HEALTHY


def test_vf_with_unbound_driver_is_unhealthy_with_reason(sim_node: SimNode) -> None:
    sim_node.unprobe("0002:01:00.4")
    pf = SysfsHost(sim_node.root).read_pf("0002:01:00.0")
    vf = next(v for v in pf.vfs if v.pci_address == "0002:01:00.4")
    assert (vf.driver, vf.netdev, vf.rdma) == (None, None, None)
    health, reason, _ = _view(_agent(sim_node, _one_pf("pfName: enP2p1s0f0np0")))["0002:01:00.4"]
    assert health is Health.UNHEALTHY and "no driver" in reason


def test_vf_without_rdma_device_is_unhealthy_only_when_rdma_is_required(sim_root: Path) -> None:
    node = SimNode(sim_root / "n", [SimPf("0000:03:00.0", "ens3f0np0", numvfs=2, rdma=False)]).build()
    vf = SysfsHost(node.root).read_pf("0000:03:00.0").vfs[0]
    assert vf.rdma is None and vf.netdev is not None
    with_rdma = _view(_agent(node, _one_pf("pfName: ens3f0np0", 2)))
    assert {h for h, _, _ in with_rdma.values()} == {Health.UNHEALTHY}
    assert all("no RDMA device" in r for _, r, _ in with_rdma.values())
    plain = _one_pf("pfName: ens3f0np0", 2).replace("    pfs:", "    rdma: false\n    pfs:")
    assert {h for h, _, _ in _view(_agent(node, plain)).values()} == {Health.HEALTHY}


def test_numa_minus_one_is_kept_as_no_affinity(sim_root: Path) -> None:
    node = SimNode(sim_root / "n", [SimPf("0000:03:00.0", "ens3f0np0", numvfs=2, numa_node=-1)]).build()
    pf = SysfsHost(node.root).read_pf("0000:03:00.0")
    assert pf.numa_node == -1 and {v.numa_node for v in pf.vfs} == {-1}
    assert {n for _, _, n in _view(_agent(node, _one_pf("pfName: ens3f0np0", 2))).values()} == {-1}


def test_pf_without_sriov_is_a_problem_and_serves_nothing(sim_root: Path) -> None:
    node = SimNode(sim_root / "n", [SimPf("0000:03:00.0", "ens3f0np0", sriov=False)]).build()
    pf = SysfsHost(node.root).read_pf("0000:03:00.0")
    assert not pf.sriov_capable and pf.vfs == ()
    agent = _agent(node, _one_pf("pfName: ens3f0np0"))
    res, _ = agent.inventory.scan()
    assert any("no SR-IOV capability" in p and "0000:03:00.0" in p for p in res.problems)
    assert _view(agent) == {}


def test_pf_without_driver_is_a_problem(sim_root: Path) -> None:
    node = SimNode(sim_root / "n", [SimPf("0000:03:00.0", "ens3f0np0", driver=None)]).build()
    res, _ = _agent(node, _one_pf('pciAddress: "0000:03:00.0"')).inventory.scan()
    assert any("no driver is bound" in p for p in res.problems)


def test_several_pfs_in_one_resource_serve_all_their_vfs(sim_root: Path) -> None:
    node = SimNode(sim_root / "n", [
        SimPf("0000:03:00.0", "ens3f0np0", numvfs=2, numa_node=0),
        SimPf("0000:81:00.0", "ens81f0np0", numvfs=3, numa_node=1),
    ]).build()
    config = ("resources:\n  - resourceName: nvidia.com/cx7_qsfp\n    pfs:\n"
              "      - pfName: ens3f0np0\n        numVfs: 2\n"
              "      - pciAddress: \"0000:81:00.0\"\n        numVfs: 3\n")
    view = _view(_agent(node, config))
    assert sorted(view) == ["0000:03:00.2", "0000:03:00.3", "0000:81:00.2", "0000:81:00.3", "0000:81:00.4"]
    assert {i: n for i, (_, _, n) in view.items()}["0000:81:00.4"] == 1


def test_pf_selected_by_name_address_or_vendor_device(sim_node: SimNode) -> None:
    by_name, _ = _agent(sim_node, _one_pf("pfName: enP2p1s0f0np0")).inventory.scan()
    by_addr, _ = _agent(sim_node, _one_pf('pciAddress: "0002:01:00.0"')).inventory.scan()
    by_id, _ = _agent(sim_node, _one_pf('vendor: "15b3"\n        device: "1021"')).inventory.scan()
    assert [m.pci_address for m in by_name.matches] == ["0002:01:00.0"]
    assert [m.pci_address for m in by_addr.matches] == ["0002:01:00.0"]
    # vendor+device picks every CX-7 PF and never its VFs (which are 15b3:101e).
    assert [m.pci_address for m in by_id.matches] == [
        "0000:01:00.0", "0000:01:00.1", "0002:01:00.0", "0002:01:00.1"]
    assert by_name.problems == by_addr.problems == by_id.problems == ()


def test_pf_name_that_is_a_vf_is_refused(sim_node: SimNode) -> None:
    res, _ = _agent(sim_node, _one_pf("pfName: enP2p1s0f0v0")).inventory.scan()
    assert res.matches == ()
    assert res.problems == (
        "nvidia.com/cx7_qsfp: PF pfName=enP2p1s0f0v0: 0002:01:00.2 is a VF of 0002:01:00.0, not a PF",)


def test_missing_pf_is_reported_and_other_resources_are_still_served(sim_node: SimNode) -> None:
    config = ("resources:\n"
              "  - {resourceName: nvidia.com/cx7_qsfp, pfs: [{pfName: enP2p1s0f0np0, numVfs: 4}]}\n"
              "  - {resourceName: nvidia.com/cx7_gone, pfs: [{pfName: ens9f0np0, numVfs: 2}]}\n")
    agent = _agent(sim_node, config)
    res, _ = agent.inventory.scan()
    assert res.problems == (
        "nvidia.com/cx7_gone: PF pfName=ens9f0np0: no such network interface on this node",)
    assert len(_view(agent, "nvidia.com/cx7_qsfp")) == 4
    assert _view(agent, "nvidia.com/cx7_gone") == {}


def test_pf_claimed_twice_keeps_the_first_claim() -> None:
    config = parse_config(
        "resources:\n"
        "  - {resourceName: example.com/a, pfs: [{pfName: ens3f0np0, numVfs: 1}]}\n"
        "  - {resourceName: example.com/b, pfs: [{pciAddress: \"0000:03:00.0\", numVfs: 1}]}\n")
    pci = [PciDevice("0000:03:00.0", "15b3", "1021", None, ("ens3f0np0",))]
    res = resolve_pfs(config, pci, {"ens3f0np0": "0000:03:00.0"})
    assert [(m.resource.resource_name, m.pci_address) for m in res.matches] == [
        ("example.com/a", "0000:03:00.0")]
    assert res.problems == ("example.com/b: PF pciAddress=0000:03:00.0: 0000:03:00.0 is already used by "
                            "example.com/a (pfName=ens3f0np0)",)


def test_unknown_pci_address_and_vendor_id_are_reported() -> None:
    config = parse_config(
        "resources:\n  - resourceName: example.com/a\n    pfs:\n"
        "      - pciAddress: \"0000:09:00.0\"\n        numVfs: 1\n"
        "      - vendor: \"8086\"\n        device: \"1592\"\n        numVfs: 1\n")
    res = resolve_pfs(config, [PciDevice("0000:03:00.0", "15b3", "1021", None)], {})
    assert res.matches == ()
    assert res.problems == ("example.com/a: PF pciAddress=0000:09:00.0: no such PCI device on this node",
                            "example.com/a: PF vendor=8086,device=1592: no physical function with that id")


def test_dgx_spark_layout_uses_kernel_symlinks(sim_root: Path) -> None:
    node = dgx_spark(sim_root / "n")
    sys = node.root / "sys"
    # Every view is a relative symlink into sys/devices, as on a real host.
    assert (sys / "bus/pci/devices/0002:01:00.2").resolve() == node.device_dir("0002:01:00.2")
    assert (sys / "class/net/enP2p1s0f0v0/device").resolve() == node.device_dir("0002:01:00.2")
    assert (node.device_dir("0002:01:00.2") / "physfn").resolve() == node.device_dir("0002:01:00.0")
    rdma = node.rdma_name("0002:01:00.2")
    assert (sys / "class/infiniband" / rdma / "device").resolve() == node.device_dir("0002:01:00.2")
    assert (node.device_dir("0002:01:00.2") / "driver").resolve() == sys / "bus/pci/drivers/mlx5_core"
    assert (node.device_dir("0002:01:00.0") / "vendor").read_text() == "0x15b3\n"
    assert (sys / "class/infiniband" / rdma / "ports/1/state").read_text() == "4: ACTIVE\n"
