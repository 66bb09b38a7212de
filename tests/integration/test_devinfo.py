"""Device-info files for Multus: one per VF served, in place before every Register, none for a VF
that is not served; the same name, content and mode (0444) as the file Allocate writes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from agent._pb.deviceplugin.v1beta1 import api_pb2
from agent.core.inventory import devinfo_owner
from agent.settings import Settings
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import SimNode
from tests.conftest import CX7_CONFIG, RESOURCE, RunAgent, node_settings

PF = "0002:01:00.0"
VFS = ["0002:01:00.2", "0002:01:00.3", "0002:01:00.4", "0002:01:00.5"]
Snapshot = dict[str, tuple[str, int]]


def snapshot(d: Path) -> Snapshot:
    """Every file in the directory: content and permission bits."""
    if not d.exists():
        return {}
    return {p.name: (p.read_text(), stat.S_IMODE(p.stat().st_mode)) for p in d.iterdir()}


def expected(node: SimNode, vfs: list[str]) -> Snapshot:
    return {f"nvidia.com-cx7_qsfp-{vf}-device.json": (json.dumps(
        {"type": "pci", "version": "1.1.0", "pci": {"pci-address": vf, "rdma-device": node.rdma_name(vf)}},
        separators=(",", ":")), 0o444) for vf in vfs}


def record_at_register(kubelet: FakeKubelet, devinfo: Path) -> list[Snapshot]:
    """What the device-info directory held each time a Register reached the kubelet."""
    seen: list[Snapshot] = []

    async def hook(_request: api_pb2.RegisterRequest) -> str:
        seen.append(snapshot(devinfo))
        return ""
    kubelet.before_register = hook
    return seen


def test_node_reboot_files_are_back_before_the_register(sim_node: SimNode, sim_settings: Settings,
                                                        run_agent: RunAgent) -> None:
    """After a reboot /var/run is empty and the kubelet re-admits running pods from its checkpoint
    without calling Allocate: each VF's file must be there by the time the agent registers."""
    devinfo = Path(sim_settings.devinfo_dir)

    async def boot() -> list[Snapshot]:
        async with run_agent(sim_settings, CX7_CONFIG, start_kubelet=False) as (_, kubelet):
            seen = record_at_register(kubelet, devinfo)
            await kubelet.start()
            await kubelet.wait_for(lambda: kubelet.healthy(RESOURCE) == VFS, timeout=20)
            # Allocate writes the very same file again.
            before = snapshot(devinfo)
            await kubelet.allocate(RESOURCE, ["0002:01:00.3"])
            assert snapshot(devinfo) == before
        return seen

    assert asyncio.run(boot()) == [expected(sim_node, VFS)]
    shutil.rmtree(devinfo)  # the reboot: tmpfs /var/run is gone, the kubelet and the agent start again
    assert asyncio.run(boot()) == [expected(sim_node, VFS)]


def test_files_of_a_previous_run_are_made_right_and_others_left_alone(sim_node: SimNode,
                                                                      sim_settings: Settings,
                                                                      run_agent: RunAgent) -> None:
    devinfo = Path(sim_settings.devinfo_dir)
    devinfo.mkdir(parents=True)
    gone = devinfo / "nvidia.com-cx7_qsfp-0002:01:00.7-device.json"  # a VF that no longer exists
    gone.write_text('{"type":"pci","version":"1.1.0","pci":{"pci-address":"0002:01:00.7"}}')
    wrong = devinfo / "nvidia.com-cx7_qsfp-0002:01:00.2-device.json"  # ours, but stale and writable
    wrong.write_text("{}")
    others = {"intel.com-sriov-0000:3b:00.2-device.json": ("{}", 0o444),  # another plugin's
              "nvidia.com-cx7_qsfp-extra-device.json": ("x", 0o644),  # not a VF file
              "README": ("mine", 0o600)}
    for name, (content, mode) in others.items():
        (devinfo / name).write_text(content)
        os.chmod(devinfo / name, mode)

    async def body() -> list[Snapshot]:
        async with run_agent(sim_settings, CX7_CONFIG, start_kubelet=False) as (_, kubelet):
            seen = record_at_register(kubelet, devinfo)
            await kubelet.start()
            await kubelet.wait_for(lambda: kubelet.healthy(RESOURCE) == VFS, timeout=20)
        return seen
    assert asyncio.run(body()) == [expected(sim_node, VFS) | others]


def test_files_follow_the_vfs_served(sim_node: SimNode, sim_settings: Settings, run_agent: RunAgent) -> None:
    devinfo = Path(sim_settings.devinfo_dir)

    async def body() -> None:
        async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
            assert snapshot(devinfo) == expected(sim_node, VFS)
            sim_node.remove_vfs(PF)
            await agent.inventory.rescan("test: VFs removed")
            await kubelet.wait_for(lambda: kubelet.devices(RESOURCE) == {})
            assert snapshot(devinfo) == {}
            sim_node.create_vfs(PF, 2)
            await agent.inventory.rescan("test: 2 VFs created")
            await kubelet.wait_for(lambda: kubelet.healthy(RESOURCE) == VFS[:2])
            assert snapshot(devinfo) == expected(sim_node, VFS[:2])
    asyncio.run(body())


def test_kubelet_restart_keeps_the_files_and_restores_wiped_ones(sim_node: SimNode, sim_settings: Settings,
                                                                 run_agent: RunAgent) -> None:
    devinfo = Path(sim_settings.devinfo_dir)

    async def body() -> list[Snapshot]:
        async with run_agent(sim_settings, CX7_CONFIG) as (_, kubelet):
            inodes = {p.name: p.stat().st_ino for p in devinfo.iterdir()}
            seen = record_at_register(kubelet, devinfo)
            await kubelet.restart()  # a kubelet restart touches no device-info file...
            await kubelet.wait_for(lambda: kubelet.registers_per_instance(RESOURCE)[2] == 1, timeout=20)
            assert {p.name: p.stat().st_ino for p in devinfo.iterdir()} == inodes  # ...nor do we
            for p in devinfo.iterdir():
                p.unlink()  # someone wiped them while the agent ran
            await kubelet.restart()
            await kubelet.wait_for(lambda: kubelet.registers_per_instance(RESOURCE)[3] == 1, timeout=20)
        return seen
    assert asyncio.run(body()) == [expected(sim_node, VFS)] * 2


def test_a_devinfo_dir_we_cannot_write_does_not_stop_serving(sim_node: SimNode, sim_root: Path,
                                                             run_agent: RunAgent,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    blocker = sim_root / "not-a-dir"
    blocker.write_text("")
    settings = node_settings(sim_node.root, devinfo_dir=str(blocker / "dp"))

    async def body() -> None:
        async with run_agent(settings, CX7_CONFIG) as (_, kubelet):
            assert kubelet.healthy(RESOURCE) == VFS
    asyncio.run(body())
    assert any(r.getMessage().startswith(f"device-info file {blocker / 'dp'}: cannot list the directory")
               for r in caplog.records)


@pytest.mark.parametrize(("name", "ours"), [
    ("nvidia.com-cx7_qsfp-0002:01:00.2-device.json", True),
    ("example.com-vf-0000:3b:1f.7-device.json", True),
    ("nvidia.com-cx7_qsfp-0002:01:00.2-device.json.bak", False),
    ("nvidia.com-cx7_qsfp-extra-0002:01:00.2-device.json", False),
    ("nvidia.com-cx7-0002:01:00.2-device.json", False),
    ("intel.com-sriov-0000:3b:00.2-device.json", False),
    ("nvidia.com-cx7_qsfp-0002:01:00.8-device.json", False),
])
def test_which_files_are_ours(name: str, ours: bool) -> None:
    assert devinfo_owner(["nvidia.com/cx7_qsfp", "example.com/vf"])(name) is ours
