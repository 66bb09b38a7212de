"""What reaches the kubelet and Multus is the same from the community plugin and from our agent.

One run per module: the community plugin (the peer), then our agent, each started as a real process
on the same simulated DGX Spark against the same kubelet stand-in. Each registers, lists its devices,
answers two Allocate calls (one VF; two VFs in reverse order) and gets SIGTERM. The tests compare
what the kubelet received and what lay in the device-info directory at each step.

The only differences allowed are the deliberate ones in ``DELIBERATE`` (docs/parity.md says why
ours is right and cites the upstream source). Each must still be observed: a difference that
disappears is taken off the list, so the list cannot grow stale.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from agent._pb.deviceplugin.v1beta1 import api_pb2
from agent.sim.peer import peer_node

from .conftest import (
    DELIBERATE,
    REPO_ROOT,
    RESOURCE,
    SOCKET,
    Parity,
    kubelet_for,
    observe,
    serving,
)

pytestmark = pytest.mark.peer

ENV = "PCIDEVICE_NVIDIA_COM_CX7_QSFP"


@pytest.fixture(scope="module")
def parity(binary: Path) -> Parity:
    with peer_node(binary) as node:
        async def both() -> Parity:
            async with serving(kubelet_for(node)) as kubelet:
                peer = await observe(node, kubelet, node.peer())
                ours = await observe(node, kubelet, node.ours())
                return Parity(peer, ours, node.vfs())
        return asyncio.run(both())


def _info(alloc: api_pb2.ContainerAllocateResponse) -> dict[str, Any]:
    raw = alloc.envs[ENV + "_INFO"]
    parsed: dict[str, Any] = json.loads(raw)
    # Go's encoding/json form: keys sorted, no spaces. Equal parsed values then mean equal strings.
    assert raw == json.dumps(parsed, sort_keys=True, separators=(",", ":"))
    return parsed


def _without_rdma_dev(info: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(info))
    for entry in out.values():
        assert "rdma_dev" in entry["rdma"], "deliberate difference info-rdma-dev no longer observed"
        del entry["rdma"]["rdma_dev"]
    return out


def test_register_request_endpoint_version_and_resource_are_the_same(parity: Parity) -> None:
    peer, ours = parity.peer, parity.ours
    for o in (peer, ours):
        assert [(r.version, r.endpoint, r.resource_name) for r in o.requests] == \
            [("v1beta1", SOCKET, RESOURCE)], o.log[-2000:]
    # DELIBERATE["preferred-allocation"]: the peer sends no options at all.
    assert not peer.requests[0].HasField("options")
    assert ours.requests[0].options == api_pb2.DevicePluginOptions(get_preferred_allocation_available=True)


def test_device_plugin_options_differ_only_by_preferred_allocation(parity: Parity) -> None:
    peer, ours = parity.peer, parity.ours
    assert peer.options == api_pb2.DevicePluginOptions()
    assert ours.options == api_pb2.DevicePluginOptions(get_preferred_allocation_available=True)


def test_device_ids_health_and_numa_topology_are_the_same(parity: Parity) -> None:
    """As sets: the peer sends its devices in Go map order, which changes from run to run (the kubelet
    keys them by ID); ours sends them sorted."""
    peer, ours = parity.peer, parity.ours
    assert sorted(peer.devices) == [(vf, "Healthy", (0,)) for vf in parity.vfs]
    assert sorted(ours.devices) == sorted(peer.devices)


def test_allocate_env_names_and_values_are_the_same(parity: Parity) -> None:
    peer, ours = parity.peer, parity.ours
    for requested, p, o in zip(parity.requests, peer.allocations, ours.allocations,
                               strict=True):
        assert sorted(o.envs) == sorted(p.envs) == [ENV, ENV + "_INFO"]
        assert o.envs[ENV] == p.envs[ENV] == ",".join(requested)  # request order, not sorted
        peer_info, our_info = _info(p), _info(o)
        assert list(peer_info) == sorted(requested)
        for entry in peer_info.values():
            assert sorted(entry) == ["generic", "rdma"]
            assert sorted(entry["rdma"]) == ["issm", "rdma_cm", "umad", "uverbs"]
        assert _without_rdma_dev(our_info) == peer_info  # DELIBERATE["info-rdma-dev"]


def test_allocate_device_specs_in_order_and_mounts_are_the_same(parity: Parity) -> None:
    peer, ours = parity.peer, parity.ours

    def specs(a: api_pb2.ContainerAllocateResponse) -> list[tuple[str, str, str]]:
        return [(d.container_path, d.host_path, d.permissions) for d in a.devices]

    for p, o in zip(peer.allocations, ours.allocations, strict=True):
        assert specs(o) == specs(p)
        assert list(o.mounts) == list(p.mounts) == []
        assert dict(o.annotations) == dict(p.annotations) == {}
        assert list(o.cdi_devices) == list(p.cdi_devices) == []
    # Two VFs in request order, each as issm, umad, uverbs, rdma_cm; rdma_cm only the first time.
    assert [s[0] for s in specs(peer.allocations[1])] == [
        f"/dev/infiniband/{n}" for n in ("issm7", "umad7", "uverbs7", "rdma_cm", "issm5", "umad5", "uverbs5")]
    assert {s[2] for s in specs(peer.allocations[1])} == {"rw"}


def _expected_devinfo(vfs: list[str]) -> dict[str, tuple[str, str]]:
    rdma = {vf: f"mlx5_{4 + i}" for i, vf in enumerate(vfs)}
    return {f"nvidia.com-cx7_qsfp-{vf}-device.json": (
        f'{{"type":"pci","version":"1.1.0","pci":{{"pci-address":"{vf}","rdma-device":"{rdma[vf]}"}}}}',
        "0o444") for vf in vfs}


def test_device_info_files_at_start_are_the_same(parity: Parity) -> None:
    """Before any Allocate: what Multus finds for pods the kubelet re-admits from its checkpoint."""
    peer, ours = parity.peer, parity.ours
    assert peer.devinfo_at_start == _expected_devinfo(parity.vfs)
    assert ours.devinfo_at_start == peer.devinfo_at_start


def test_device_info_files_after_allocate_are_the_same(parity: Parity) -> None:
    peer, ours = parity.peer, parity.ours
    assert peer.devinfo_after_allocate == _expected_devinfo(parity.vfs)
    assert ours.devinfo_after_allocate == peer.devinfo_after_allocate


def test_sigterm_exits_0_and_removes_the_socket(parity: Parity) -> None:
    peer, ours = parity.peer, parity.ours
    for o in (peer, ours):
        assert o.exit_code == 0, o.log[-3000:]
        assert o.sockets_after_exit == ["kubelet.sock"], o.log[-3000:]


def test_device_info_files_after_sigterm(parity: Parity) -> None:
    """DELIBERATE["devinfo-kept-on-exit"]: the VFs stay with their pods, so do their files."""
    peer, ours = parity.peer, parity.ours
    assert peer.devinfo_after_exit == {}
    assert ours.devinfo_after_exit == ours.devinfo_after_allocate == peer.devinfo_after_allocate


def test_every_deliberate_difference_is_documented() -> None:
    doc = (REPO_ROOT / "docs/parity.md").read_text()
    listed = re.findall(r"^\| `([a-z-]+)` \|", doc, flags=re.MULTILINE)
    assert listed == list(DELIBERATE)
