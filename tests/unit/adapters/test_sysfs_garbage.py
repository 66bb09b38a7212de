"""Kernel surprises in sysfs: garbage, loops, huge and blocking files. Each is the problem of the one
device it belongs to, reported with its path; every other device keeps being read and served."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.adapters.sysfs import MAX_ATTR_BYTES, SysfsHost
from agent.adapters.udev import DeviceEvent
from agent.app import App, build_agent
from agent.config import parse_config
from agent.errors import SysfsContentError, SysfsError
from agent.settings import Settings
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import SimNode
from tests.conftest import RESOURCE, node_settings

PF_A, PF_B = "0002:01:00.0", "0002:01:00.1"
VFS_A = ["0002:01:00.2", "0002:01:00.3", "0002:01:00.4", "0002:01:00.5"]
OTHER = "0000:00:1f.0"  # an unrelated PCI device (a chipset function)
TWO_PFS = (f"resources:\n  - resourceName: {RESOURCE}\n    pfs:\n"
           "      - {pfName: enP2p1s0f0np0, numVfs: 4}\n      - {pfName: enP2p1s0f1np1, numVfs: 2}\n")


@pytest.fixture
def node(sim_node: SimNode) -> SimNode:
    """The DGX Spark node with VFs on both 0002 ports and an unrelated PCI device next to them."""
    sim_node.set_pf_link(PF_B, up=True)  # first: VFs of a port that is down have their ports down
    sim_node.create_vfs(PF_B, 2)
    d = sim_node.sys / "devices/pci0000:00" / OTHER
    d.mkdir(parents=True)
    (d / "vendor").write_text("0x8086\n")
    (d / "device").write_text("0x7a04\n")
    os.symlink(d, sim_node.sys / "bus/pci/devices" / OTHER)
    return sim_node


def garbage(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01")


def loop(path: Path) -> None:
    """Replace ``path`` by a symlink that points at itself (ELOOP on every open or listdir)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    os.symlink(path.name, path)


# ---------------------------------------------------------------- the reader


def test_binary_sriov_numvfs_is_a_content_error_naming_the_file(node: SimNode) -> None:
    garbage(node.device_dir(PF_B) / "sriov_numvfs")
    with pytest.raises(SysfsContentError) as err:
        SysfsHost(node.root).read_pf(PF_B)
    assert err.value.path.endswith(f"{PF_B}/sriov_numvfs") and err.value.errno == errno.EBADMSG
    assert "not text" in str(err.value) and len(str(err.value)) < 400


def test_a_non_number_in_sriov_numvfs_is_never_read_as_zero(node: SimNode) -> None:
    (node.device_dir(PF_B) / "sriov_numvfs").write_text("two\n")
    with pytest.raises(SysfsContentError, match="not a number: 'two'"):
        SysfsHost(node.root).read_pf(PF_B)


def test_reads_are_bounded_to_one_page(node: SimNode) -> None:
    path = node.device_dir(PF_A) / "numa_node"
    with open(path, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse: reading it whole would take a GiB of memory
    with pytest.raises(SysfsContentError, match=f"more than {MAX_ATTR_BYTES} bytes"):
        SysfsHost(node.root).read_pf(PF_A)
    path.write_text("1" * MAX_ATTR_BYTES)  # a full page is still an attribute
    assert SysfsHost(node.root).read_pf(PF_A, with_vfs=False).numa_node == int("1" * MAX_ATTR_BYTES)


@pytest.mark.timeout(20)
def test_a_fifo_in_place_of_an_attribute_does_not_block(node: SimNode) -> None:
    path = node.device_dir(PF_A) / "numa_node"
    path.unlink()
    os.mkfifo(path)
    assert SysfsHost(node.root).read_pf(PF_A, with_vfs=False).numa_node == -1  # read as empty


@pytest.mark.parametrize("break_it", [garbage, loop], ids=["binary", "symlink-loop"])
def test_an_unrelated_devices_bad_vendor_marks_only_that_device(node: SimNode, break_it: object) -> None:
    assert callable(break_it)
    break_it(node.sys / "devices/pci0000:00" / OTHER / "vendor")
    by_addr = {d.pci_address: d for d in SysfsHost(node.root).list_pci()}
    assert by_addr[OTHER].error and OTHER in by_addr[OTHER].error
    assert (by_addr[OTHER].vendor, by_addr[OTHER].device) == ("", "")
    assert by_addr[PF_A].vendor == "15b3" and not by_addr[PF_A].error
    assert sum(1 for d in by_addr.values() if not d.error) == len(by_addr) - 1


def test_a_symlink_loop_at_a_vfs_net_marks_that_vf_and_spares_its_siblings(node: SimNode) -> None:
    loop(node.device_dir(VFS_A[1]) / "net")
    pf = SysfsHost(node.root).read_pf(PF_A)
    bad = [vf for vf in pf.vfs if vf.error]
    assert [vf.pci_address for vf in bad] == [VFS_A[1]]
    assert f"{VFS_A[1]}/net" in bad[0].error and "ELOOP" in bad[0].error
    assert all(vf.netdev is not None for vf in pf.vfs if not vf.error)


def test_a_symlink_loop_at_a_pfs_net_is_an_error_of_that_pf(node: SimNode) -> None:
    loop(node.device_dir(PF_B) / "net")
    host = SysfsHost(node.root)
    with pytest.raises(SysfsError) as err:
        host.read_pf(PF_B)
    assert err.value.errno == errno.ELOOP and err.value.path.endswith(f"{PF_B}/net")
    assert len(host.read_pf(PF_A).vfs) == 4


# ---------------------------------------------------------------- the running agent


@contextlib.asynccontextmanager
async def agent_on(settings: Settings) -> AsyncIterator[tuple[App, FakeKubelet, asyncio.Task[None]]]:
    kubelet = FakeKubelet(settings.device_plugin_dir)
    await kubelet.start()
    agent = build_agent(settings, parse_config(TWO_PFS))
    runner = asyncio.create_task(agent.run())
    try:
        await kubelet.wait_for(lambda: bool(kubelet.devices(RESOURCE)), timeout=10)
        yield agent, kubelet, runner
    finally:
        await agent.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await kubelet.stop()


def corrupt_all(node: SimNode) -> None:
    """Every listed kind of garbage at once: only PF B and one VF of PF A are affected."""
    garbage(node.device_dir(PF_B) / "sriov_numvfs")
    garbage(node.sys / "devices/pci0000:00" / OTHER / "vendor")
    loop(node.device_dir(VFS_A[1]) / "net")
    other2 = node.sys / "devices/pci0000:00/0000:00:1f.3"
    other2.mkdir()
    os.symlink(other2, node.sys / "bus/pci/devices/0000:00:1f.3")
    loop(other2 / "vendor")


def expect_served_despite_garbage(agent: App, kubelet: FakeKubelet) -> None:
    devices = kubelet.devices(RESOURCE)
    assert sorted(i for i, d in devices.items() if d.health == "Healthy") == [VFS_A[0], *VFS_A[2:]]
    assert devices[VFS_A[1]].health == "Unhealthy"
    reason = agent.hub.current(RESOURCE)[1].by_id()[VFS_A[1]].reason
    assert "cannot read the VF from sysfs" in reason and "ELOOP" in reason
    problems = " ".join(agent.inventory.resolution.problems)
    assert f"{PF_B}: cannot read" in problems and "sriov_numvfs" in problems


def test_garbage_at_start_up_is_reported_and_the_rest_served(node: SimNode,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    corrupt_all(node)

    async def body() -> None:
        async with agent_on(node_settings(node.root)) as (agent, kubelet, runner):
            await kubelet.wait_for(lambda: len(kubelet.devices(RESOURCE)) == 4, timeout=10)
            expect_served_despite_garbage(agent, kubelet)
            assert not runner.done()
    with caplog.at_level(logging.ERROR):
        asyncio.run(body())
    assert any("sriov_numvfs" in r.getMessage() for r in caplog.records)


def test_garbage_after_start_up_and_a_uevent_never_stops_the_agent(node: SimNode) -> None:
    async def body() -> None:
        async with agent_on(node_settings(node.root)) as (agent, kubelet, runner):
            await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == 6, timeout=10)
            corrupt_all(node)
            change = DeviceEvent("change", "pci", f"/devices/pci0002:00/0002:00:00.0/{PF_B}", PF_B)
            await agent.health_watch.on_uevents(agent.inventory, [change], overflowed=False)
            await kubelet.wait_for(lambda: len(kubelet.devices(RESOURCE)) == 4, timeout=10)
            expect_served_despite_garbage(agent, kubelet)
            assert not runner.done()
    asyncio.run(body())


def test_a_rescan_that_raises_is_logged_and_retried(node: SimNode, caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected failure inside the walk (a bug, an error nobody foresaw) must not end the event
    callback that asked for it: the last views stay, and the read is tried again shortly."""
    async def body() -> None:
        async with agent_on(node_settings(node.root)) as (agent, kubelet, runner):
            await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == 6, timeout=10)
            real = agent.inventory.scan
            calls = []

            def flaky(keep: object = ()) -> object:
                calls.append(1)
                if len(calls) == 1:
                    raise RuntimeError("surprise")
                return real(keep)  # type: ignore[arg-type]

            agent.inventory.scan = flaky  # type: ignore[method-assign]
            node.set_pf_link(PF_B, up=False)  # a change only a fresh read shows
            await agent.health_watch.on_uevents(
                agent.inventory,
                [DeviceEvent("change", "pci", f"/devices/pci0002:00/0002:00:00.0/{PF_B}", PF_B)],
                overflowed=False)
            assert calls == [1] and not runner.done()
            assert len(kubelet.healthy(RESOURCE)) == 6  # the last good view is kept meanwhile
            await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == 4, timeout=10)  # retried
            assert len(calls) >= 2
    with caplog.at_level(logging.ERROR):
        asyncio.run(body())
    assert any("reading the node failed" in r.getMessage() and "surprise" in r.getMessage()
               for r in caplog.records)
