"""The vfio-pci kind against the community plugin: the QSFP port's VFs bound to vfio-pci on a simulated
node with /sys/kernel/iommu_groups, served by the peer with its ``"drivers": ["vfio-pci"]`` selector
and by ours with ``deviceType: vfio-pci``, one after the other, as in test_parity.py.

Compared: Register, device IDs, health and NUMA, Allocate (env names and values, device specs in order,
mounts) for one VF and for two, and the device-info files. The one difference allowed is
``DELIBERATE["vfio-dev-mount"]`` (docs/parity.md): the binary's vfio info provider fills ``dev-mount``
only once a VF's device specs were computed, which Allocate does after the env.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent._pb.deviceplugin.v1beta1 import api_pb2
from agent.sim.peer import VFIO_RESOURCE, peer_node

from .conftest import Parity, kubelet_for, observe, serving

pytestmark = pytest.mark.peer

SOCKET = "nvidia.com_cx7_dpdk.sock"
ENV = "PCIDEVICE_NVIDIA_COM_CX7_DPDK"


@pytest.fixture(scope="module")
def vfio(binary: Path) -> tuple[Parity, dict[str, str]]:
    """The parity run and each VF's IOMMU group (from the simulated sysfs)."""
    with peer_node(binary, vfio=True) as node:
        vfs = node.vfs()
        groups = {vf: os.readlink(node.sim.device_dir(vf) / "iommu_group").rsplit("/", 1)[-1] for vf in vfs}
        assert all((node.sim.dev / "vfio" / g).exists() for g in groups.values())

        async def both() -> Parity:
            async with serving(kubelet_for(node)) as kubelet:
                peer = await observe(node, kubelet, node.peer(), VFIO_RESOURCE)
                ours = await observe(node, kubelet, node.ours(), VFIO_RESOURCE)
                return Parity(peer, ours, vfs)
        return asyncio.run(both()), groups


def _info(alloc: api_pb2.ContainerAllocateResponse) -> dict[str, Any]:
    raw = alloc.envs[ENV + "_INFO"]
    parsed: dict[str, Any] = json.loads(raw)
    assert raw == json.dumps(parsed, sort_keys=True, separators=(",", ":"))  # Go's encoding/json form
    return parsed


def test_register_and_devices_are_the_same(vfio: tuple[Parity, dict[str, str]]) -> None:
    parity, _ = vfio
    peer, ours = parity.peer, parity.ours
    for o in (peer, ours):
        assert [(r.version, r.endpoint, r.resource_name) for r in o.requests] == \
            [("v1beta1", SOCKET, VFIO_RESOURCE)], o.log[-2000:]
    assert sorted(peer.devices) == [(vf, "Healthy", (0,)) for vf in parity.vfs]
    assert sorted(ours.devices) == sorted(peer.devices)


def test_allocate_envs_are_the_same_but_for_dev_mount(vfio: tuple[Parity, dict[str, str]]) -> None:
    parity, groups = vfio
    for requested, p, o in zip(parity.requests, parity.peer.allocations, parity.ours.allocations,
                               strict=True):
        assert sorted(o.envs) == sorted(p.envs) == [ENV, ENV + "_INFO"]
        assert o.envs[ENV] == p.envs[ENV] == ",".join(requested)
        peer_info, our_info = _info(p), _info(o)
        # DELIBERATE["vfio-dev-mount"]: each VF's first Allocate, so the peer has no dev-mount yet.
        assert peer_info == {vf: {"generic": {"deviceID": vf}, "vfio": {"mount": "/dev/vfio/vfio"}}
                             for vf in requested}
        assert our_info == {vf: {"generic": {"deviceID": vf},
                                 "vfio": {"dev-mount": f"/dev/vfio/{groups[vf]}", "mount": "/dev/vfio/vfio"}}
                            for vf in requested}


def test_allocate_device_specs_in_order_and_mounts_are_the_same(vfio: tuple[Parity, dict[str, str]]) -> None:
    parity, groups = vfio

    def specs(a: api_pb2.ContainerAllocateResponse) -> list[tuple[str, str, str]]:
        return [(d.container_path, d.host_path, d.permissions) for d in a.devices]

    for requested, p, o in zip(parity.requests, parity.peer.allocations, parity.ours.allocations,
                               strict=True):
        assert specs(o) == specs(p) == [("/dev/vfio/vfio", "/dev/vfio/vfio", "rw")] + [
            (f"/dev/vfio/{groups[vf]}", f"/dev/vfio/{groups[vf]}", "rw") for vf in requested]
        assert list(o.mounts) == list(p.mounts) == []
        assert dict(o.annotations) == dict(p.annotations) == {}


def test_device_info_files_are_the_same(vfio: tuple[Parity, dict[str, str]]) -> None:
    parity, _ = vfio
    peer, ours = parity.peer, parity.ours
    expected = {f"nvidia.com-cx7_dpdk-{vf}-device.json": (
        f'{{"type":"pci","version":"1.1.0","pci":{{"pci-address":"{vf}"}}}}', "0o444") for vf in parity.vfs}
    assert peer.devinfo_at_start == peer.devinfo_after_allocate == expected
    assert ours.devinfo_at_start == ours.devinfo_after_allocate == expected
    for o in (peer, ours):
        assert o.exit_code == 0, o.log[-3000:]
