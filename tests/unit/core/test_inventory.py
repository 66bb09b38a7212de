"""Allocate responses (as the community SR-IOV device plugin gives them) and preferred allocations."""

from __future__ import annotations

import json

import pytest

from agent.adapters.sysfs import SysfsHost
from agent.config import parse_config
from agent.core.inventory import NodeState, allocate, build_view, devinfo_file_name, preferred_allocation
from agent.errors import AllocationError
from agent.model import DeviceStatus, Health, ResourceView
from agent.sim.node import SimNode
from tests.conftest import CX7_CONFIG, RESOURCE

RES = parse_config(CX7_CONFIG).resources[0]


def _state(node: SimNode) -> tuple[ResourceView, NodeState, SysfsHost]:
    host = SysfsHost(node.root)
    pf = host.read_pf("0002:01:00.0")
    return build_view(RES, [pf], (), host.dev_path_exists), NodeState({pf.pci_address: pf}), host


def _n(node: SimNode, vf: str) -> str:
    """N of the VF's mlx5_N / uverbsN (the simulator numbers char devices like the RDMA device)."""
    return node.rdma_name(vf).removeprefix("mlx5_")


def test_allocate_one_vf_matches_the_community_plugin(sim_node: SimNode) -> None:
    view, state, host = _state(sim_node)
    vf = "0002:01:00.3"
    n = _n(sim_node, vf)
    out = allocate(RES, [vf], view, state, host.dev_path_exists)
    assert out.envs["PCIDEVICE_NVIDIA_COM_CX7_QSFP"] == vf
    assert out.envs["PCIDEVICE_NVIDIA_COM_CX7_QSFP_INFO"] == (
        '{"0002:01:00.3":{"generic":{"deviceID":"0002:01:00.3"},'
        f'"rdma":{{"issm":"/dev/infiniband/issm{n}","rdma_cm":"/dev/infiniband/rdma_cm",'
        f'"rdma_dev":"mlx5_{n}","umad":"/dev/infiniband/umad{n}","uverbs":"/dev/infiniband/uverbs{n}"}}}}}}')
    assert [(d.host_path, d.container_path, d.permissions) for d in out.devices] == [
        (f"/dev/infiniband/issm{n}", f"/dev/infiniband/issm{n}", "rw"),
        (f"/dev/infiniband/umad{n}", f"/dev/infiniband/umad{n}", "rw"),
        (f"/dev/infiniband/uverbs{n}", f"/dev/infiniband/uverbs{n}", "rw"),
        ("/dev/infiniband/rdma_cm", "/dev/infiniband/rdma_cm", "rw"),
    ]
    assert out.devinfo == {
        "nvidia.com-cx7_qsfp-0002:01:00.3-device.json":
            f'{{"type":"pci","version":"1.1.0","pci":{{"pci-address":"{vf}","rdma-device":"mlx5_{n}"}}}}'}


def test_allocate_keeps_request_order_and_dedupes_rdma_cm(sim_node: SimNode) -> None:
    view, state, host = _state(sim_node)
    ids = ["0002:01:00.5", "0002:01:00.2"]
    out = allocate(RES, ids, view, state, host.dev_path_exists)
    assert out.envs[RES.env_name] == "0002:01:00.5,0002:01:00.2"
    info = json.loads(out.envs[RES.env_name + "_INFO"])
    assert list(info) == sorted(ids)  # keys sorted, as Go's encoding/json writes a map
    paths = [d.host_path for d in out.devices]
    assert paths.count("/dev/infiniband/rdma_cm") == 1
    a, b = _n(sim_node, ids[0]), _n(sim_node, ids[1])
    assert paths == [f"/dev/infiniband/issm{a}", f"/dev/infiniband/umad{a}", f"/dev/infiniband/uverbs{a}",
                     "/dev/infiniband/rdma_cm",
                     f"/dev/infiniband/issm{b}", f"/dev/infiniband/umad{b}", f"/dev/infiniband/uverbs{b}"]
    assert sorted(out.devinfo) == sorted(devinfo_file_name(RESOURCE, i) for i in ids)


def test_only_device_nodes_present_under_dev_root_are_handed_out(sim_node: SimNode) -> None:
    view, state, host = _state(sim_node)
    vf = "0002:01:00.2"
    n = _n(sim_node, vf)
    (sim_node.root / f"dev/infiniband/umad{n}").unlink()
    (sim_node.root / f"dev/infiniband/issm{n}").unlink()
    (sim_node.root / "dev/infiniband/rdma_cm").unlink()
    out = allocate(RES, [vf], view, state, host.dev_path_exists)
    assert [d.host_path for d in out.devices] == [f"/dev/infiniband/uverbs{n}"]
    assert json.loads(out.envs[RES.env_name + "_INFO"])[vf]["rdma"] == {
        "rdma_dev": f"mlx5_{n}", "uverbs": f"/dev/infiniband/uverbs{n}"}


def test_non_rdma_resource_gets_env_only(sim_node: SimNode) -> None:
    res = parse_config(CX7_CONFIG.replace("    pfs:", "    rdma: false\n    pfs:")).resources[0]
    host = SysfsHost(sim_node.root)
    pf = host.read_pf("0002:01:00.0")
    view = build_view(res, [pf], (), host.dev_path_exists)
    out = allocate(res, ["0002:01:00.2"], view, NodeState({pf.pci_address: pf}), host.dev_path_exists)
    assert out.devices == ()
    assert out.envs[res.env_name + "_INFO"] == '{"0002:01:00.2":{"generic":{"deviceID":"0002:01:00.2"}}}'
    assert out.devinfo[devinfo_file_name(RESOURCE, "0002:01:00.2")] == (
        '{"type":"pci","version":"1.1.0","pci":{"pci-address":"0002:01:00.2"}}')


def test_unknown_id_is_refused_naming_it(sim_node: SimNode) -> None:
    view, state, host = _state(sim_node)
    with pytest.raises(AllocationError) as err:
        allocate(RES, ["0002:01:00.2", "0000:99:00.1"], view, state, host.dev_path_exists)
    assert err.value.device == "0000:99:00.1"
    assert "0000:99:00.1" in str(err.value) and RESOURCE in str(err.value)


def test_unhealthy_id_is_refused_with_the_reason(sim_node: SimNode) -> None:
    sim_node.set_pf_link("enP2p1s0f0np0", up=False)
    view, state, host = _state(sim_node)
    assert {d.health for d in view.devices} == {Health.UNHEALTHY}
    with pytest.raises(AllocationError) as err:
        allocate(RES, ["0002:01:00.4"], view, state, host.dev_path_exists)
    assert err.value.device == "0002:01:00.4"
    assert "unhealthy" in str(err.value) and "enP2p1s0f0np0 has no carrier" in str(err.value)


def test_empty_request_is_refused(sim_node: SimNode) -> None:
    view, state, host = _state(sim_node)
    with pytest.raises(AllocationError):
        allocate(RES, [], view, state, host.dev_path_exists)


# ---------------------------------------------------------------- preferred allocation

def _view(*devs: tuple[str, int, str]) -> ResourceView:
    return ResourceView(RESOURCE, tuple(DeviceStatus(i, Health.HEALTHY, numa, pf) for i, numa, pf in devs))


# Two NUMA nodes; NUMA 0 has PF A (3 VFs) and PF B (1 VF), NUMA 1 has PF C (2 VFs).
VIEW = _view(("a1", 0, "A"), ("a2", 0, "A"), ("a3", 0, "A"), ("b1", 0, "B"), ("c1", 1, "C"), ("c2", 1, "C"))
ALL = [d.id for d in VIEW.devices]


def test_preferred_packs_a_request_onto_one_pf() -> None:
    assert preferred_allocation(ALL, [], 2, VIEW) == ["c1", "c2"]  # the tightest PF that fits
    assert preferred_allocation(ALL, [], 3, VIEW) == ["a1", "a2", "a3"]
    assert preferred_allocation(ALL, [], 1, VIEW) == ["b1"]  # keeps the bigger groups whole


def test_preferred_honours_must_include_then_same_pf_then_same_numa() -> None:
    assert preferred_allocation(ALL, ["c2"], 2, VIEW) == ["c2", "c1"]
    assert preferred_allocation(ALL, ["a2"], 3, VIEW) == ["a2", "a1", "a3"]
    # PF A is exhausted after two more: the fourth comes from the same NUMA node (B), not from C.
    assert preferred_allocation(ALL, ["a1"], 4, VIEW) == ["a1", "a2", "a3", "b1"]


def test_preferred_spills_over_when_no_group_is_big_enough() -> None:
    out = preferred_allocation(ALL, [], 5, VIEW)
    assert out[:3] == ["a1", "a2", "a3"] and out[3] == "b1" and len(out) == 5


def test_preferred_ignores_ids_it_does_not_know_and_never_exceeds_size() -> None:
    assert preferred_allocation(["zz", "c1", "c2"], [], 2, VIEW) == ["c1", "c2"]
    assert preferred_allocation(ALL, ["a1", "a2", "a3"], 2, VIEW) == ["a1", "a2"]
    assert preferred_allocation(ALL, [], 0, VIEW) == []


NCCL_RES = parse_config(CX7_CONFIG.replace("    pfs:", "    ncclHints: true\n    pfs:")).resources[0]


def test_nccl_hints_name_exactly_the_allocated_rdma_devices_in_request_order(sim_node: SimNode) -> None:
    view, state, host = _state(sim_node)
    ids = ["0002:01:00.4", "0002:01:00.2"]
    out = allocate(NCCL_RES, ids, view, state, host.dev_path_exists)
    want = ",".join(sim_node.rdma_name(i) for i in ids)
    assert out.envs["NCCL_IB_HCA"] == "=" + want  # the env line reads NCCL_IB_HCA==mlx5_6,mlx5_4
    # Everything the community plugin sends is unchanged by the hint.
    plain = allocate(RES, ids, view, state, host.dev_path_exists)
    assert {k: v for k, v in out.envs.items() if k != "NCCL_IB_HCA"} == plain.envs
    assert out.devices == plain.devices and out.devinfo == plain.devinfo


def test_nccl_hints_are_off_by_default(sim_node: SimNode) -> None:
    view, state, host = _state(sim_node)
    out = allocate(RES, ["0002:01:00.2"], view, state, host.dev_path_exists)
    assert "NCCL_IB_HCA" not in out.envs
