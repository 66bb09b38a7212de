"""Uevent parsing and handling: kernel and libudev framing, filtering, and what the agent does with them."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.adapters.udev import (
    DeviceEvent,
    UeventWatcher,
    choose_source,
    event_from_properties,
    parse_datagram,
)
from agent.app import build_agent
from agent.config import HealthSettings, parse_config
from agent.settings import Settings
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import SimNode, dgx_spark

RESOURCE = "nvidia.com/cx7_qsfp"
VF = "0002:01:00.3"
VF_DEVPATH = f"/devices/pci0002:00/0002:00:00.0/{VF}"


def kernel_datagram(action: str, devpath: str, **props: str) -> bytes:
    fields = {"ACTION": action, "DEVPATH": devpath, **props, "SEQNUM": "4242"}
    return f"{action}@{devpath}\0".encode() + b"".join(f"{k}={v}\0".encode() for k, v in fields.items())


def libudev_datagram(**props: str) -> bytes:
    body = b"".join(f"{k}={v}\0".encode() for k, v in props.items())
    header = struct.pack("8sIIIIIIII", b"libudev\0", 0xFEEDCAFE, 40, 40, len(body), 0, 0, 0, 0)
    return header + body


def test_kernel_unbind_of_a_vf() -> None:
    props = parse_datagram(kernel_datagram("unbind", VF_DEVPATH, SUBSYSTEM="pci", DRIVER="mlx5_core",
                                           PCI_SLOT_NAME=VF))
    assert props is not None
    ev = event_from_properties(props)
    assert ev == DeviceEvent("unbind", "pci", VF_DEVPATH, VF, driver="mlx5_core")
    assert not ev.virtual and ev.matters(set())


def test_libudev_framed_rdma_device_removal() -> None:
    props = parse_datagram(libudev_datagram(ACTION="remove", SUBSYSTEM="infiniband", NAME="mlx5_5",
                                            DEVPATH=f"{VF_DEVPATH}/infiniband/mlx5_5"))
    assert props is not None
    ev = event_from_properties(props)
    assert ev is not None and (ev.action, ev.subsystem, ev.name) == ("remove", "infiniband", "mlx5_5")


def test_net_rename_carries_interface_and_old_name() -> None:
    props = parse_datagram(kernel_datagram("move", f"{VF_DEVPATH}/net/enP2p1s0f0v1", SUBSYSTEM="net",
                                           INTERFACE="enP2p1s0f0v1", DEVPATH_OLD=f"{VF_DEVPATH}/net/eth3"))
    assert props is not None
    ev = event_from_properties(props)
    assert ev is not None and (ev.name, ev.old_name) == ("enP2p1s0f0v1", "eth3")


@pytest.mark.parametrize("data", [
    kernel_datagram("add", "/devices/virtual/net/veth1/queues/rx-0", SUBSYSTEM="queues"),
    kernel_datagram("add", "/devices/system/cpu/cpu1", SUBSYSTEM="cpu"),
    kernel_datagram("offline", VF_DEVPATH, SUBSYSTEM="pci"),
])
def test_events_we_do_not_follow_are_dropped(data: bytes) -> None:
    props = parse_datagram(data)
    assert props is not None and event_from_properties(props) is None


@pytest.mark.parametrize("data", [b"", b"garbage without separator", b"libudev\0short"])
def test_malformed_datagrams_are_ignored(data: bytes) -> None:
    assert parse_datagram(data) is None


def test_pod_veths_do_not_matter_unless_watched() -> None:
    props = parse_datagram(kernel_datagram("add", "/devices/virtual/net/veth9", SUBSYSTEM="net",
                                           INTERFACE="veth9"))
    assert props is not None
    ev = event_from_properties(props)
    assert ev is not None and ev.virtual
    assert not ev.matters({"enP2p1s0f0np0"}) and ev.matters({"veth9"})


def test_source_is_udev_only_with_udevd_control_socket(tmp_path: Path) -> None:
    assert choose_source(str(tmp_path)) == "kernel"
    (tmp_path / "control").touch()
    assert choose_source(str(tmp_path)) == "udev"


class ScriptedSocket:
    """A uevent socket that returns queued datagrams, then an overflow, then nothing."""

    def __init__(self, reads: list[bytes | OSError]) -> None:
        self.reads = reads
        r, w = os.pipe()
        self._r, self._w = r, w
        os.set_blocking(r, False)
        os.write(w, b"x")  # make the fd readable once

    def fileno(self) -> int:
        return self._r

    def recv(self, bufsize: int) -> bytes:
        if not self.reads:
            with contextlib.suppress(BlockingIOError):
                os.read(self._r, 1)
            raise BlockingIOError
        item = self.reads.pop(0)
        if isinstance(item, OSError):
            raise item
        return item

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


def test_overflow_is_reported_so_the_caller_rereads_everything() -> None:
    sock = ScriptedSocket([kernel_datagram("unbind", VF_DEVPATH, SUBSYSTEM="pci"),
                           OSError(errno.ENOBUFS, "No buffer space available")])
    watcher = UeventWatcher(source="kernel", opener=lambda ns, group: sock)
    batches: list[tuple[list[DeviceEvent], bool]] = []

    async def body() -> None:
        async def on_events(events: list[DeviceEvent], overflowed: bool) -> None:
            batches.append((events, overflowed))

        task = asyncio.create_task(watcher.run(on_events))
        while not batches:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(body())
    assert [(len(evs), over) for evs, over in batches] == [(1, True)]
    assert watcher.stats.get("netlink_resyncs", reason="uevent-enobufs") == 1


@pytest.fixture
def node() -> Iterator[SimNode]:
    root = Path(tempfile.mkdtemp(prefix="sriovu-"))  # short: unix socket paths
    try:
        yield dgx_spark(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_driver_unbind_event_reaches_the_kubelet_and_rebind_recovers(node: SimNode) -> None:
    root = node.root
    settings = Settings(config="", sysfs_root=str(root), dev_root=str(root),
                        device_plugin_dir=str(root / "dp"), devinfo_dir=str(root / "devinfo"),
                        metrics_address="", health_address="")
    pfs = "pfs: [{pfName: enP2p1s0f0np0, numVfs: 4}]"
    config = parse_config(f"resources: [{{resourceName: {RESOURCE}, {pfs}}}]")
    unbind = DeviceEvent("unbind", "pci", VF_DEVPATH, VF, driver="mlx5_core")
    bind = DeviceEvent("bind", "pci", VF_DEVPATH, VF, driver="mlx5_core")

    async def body() -> None:
        kubelet = FakeKubelet(settings.device_plugin_dir)
        await kubelet.start()
        agent = build_agent(settings, config)
        agent.resources.config = replace(agent.resources.config, health=HealthSettings(recovery_s=0.0))
        runner = asyncio.create_task(agent.run())

        def health() -> str:
            ep = kubelet.endpoints.get(RESOURCE)
            return ep.devices[VF].health if ep and VF in ep.devices else ""

        try:
            await kubelet.wait_for(lambda: health() == "Healthy", timeout=10)
            node.unprobe(VF)
            await agent.health_watch.on_uevents(agent.inventory, [unbind], overflowed=False)
            await kubelet.wait_for(lambda: health() == "Unhealthy", timeout=5)
            assert agent.hub.current(RESOURCE)[1].by_id()[VF].reason == "VF has no driver bound"
            node.probe_vf(VF)
            await agent.health_watch.on_uevents(agent.inventory, [bind], overflowed=False)
            await kubelet.wait_for(lambda: health() == "Healthy", timeout=5)
        finally:
            await agent.shutdown()
            await asyncio.gather(runner, return_exceptions=True)
            await kubelet.stop()

    asyncio.run(body())


def test_hot_unplugged_vf_held_by_a_pod_stays_listed_unhealthy(node: SimNode) -> None:
    root = node.root
    settings = Settings(config="", sysfs_root=str(root), dev_root=str(root),
                        device_plugin_dir=str(root / "dp"), devinfo_dir=str(root / "devinfo"),
                        metrics_address="", health_address="")
    pfs = "pfs: [{pfName: enP2p1s0f0np0, numVfs: 4}]"
    config = parse_config(f"resources: [{{resourceName: {RESOURCE}, {pfs}}}]")
    held, free = "0002:01:00.2", "0002:01:00.3"

    def unplug(vf: str) -> None:
        """The PCI core removing a VF: its directory, bus link and the PF's virtfnN link go away."""
        index = node.vf_index(vf)
        node.unprobe(vf)
        shutil.rmtree(node.device_dir(vf))
        (node.sys / "bus/pci/devices" / vf).unlink()
        (node.device_dir("0002:01:00.0") / f"virtfn{index}").unlink()

    async def body() -> None:
        kubelet = FakeKubelet(settings.device_plugin_dir)
        await kubelet.start()
        agent = build_agent(settings, config)
        runner = asyncio.create_task(agent.run())

        def devices() -> dict[str, str]:
            ep = kubelet.endpoints.get(RESOURCE)
            return {i: d.health for i, d in ep.devices.items()} if ep else {}

        try:
            await kubelet.wait_for(lambda: len(devices()) == 4, timeout=10)
            await kubelet.allocate(RESOURCE, [held])
            unplug(held)
            unplug(free)
            remove = [DeviceEvent("remove", "pci", f"/devices/pci0002:00/0002:00:00.0/{vf}", vf)
                      for vf in (held, free)]
            await agent.health_watch.on_uevents(agent.inventory, remove, overflowed=False)
            await kubelet.wait_for(lambda: free not in devices(), timeout=5)
            assert devices()[held] == "Unhealthy"
            assert agent.hub.current(RESOURCE)[1].by_id()[held].reason == "VF PCI device is gone"
        finally:
            await agent.shutdown()
            await asyncio.gather(runner, return_exceptions=True)
            await kubelet.stop()

    asyncio.run(body())
