"""Kernel faults against the real `serve` process, run inside a throw-away network namespace.

The simulated PFs' netdevs are real veths there, so the agent's netlink and uevent sockets get the
kernel's own messages: link flaps, an overflowing receive queue, a flood of uevents.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.sim.kubelet import FakeKubelet
from tests.conftest import RESOURCE
from tests.fault.conftest import Serve, serve_settings, until
from tests.netns.conftest import VethNode, config_for

pytestmark = [pytest.mark.fault, pytest.mark.netns]

Spawn = Callable[..., Serve]


async def serving(spawn: Spawn, node: VethNode, recovery_s: float = 0.2) -> tuple[Serve, FakeKubelet]:
    node.ns.ip("link", "set", "lo", "up")  # metrics on 127.0.0.1 inside the namespace
    s = serve_settings(node.sim.root)
    Path(s.config).write_text(f"health:\n  recoverySeconds: {recovery_s}\n" + config_for(node))
    kubelet = FakeKubelet(s.device_plugin_dir)
    await kubelet.start()
    serve = spawn(s, ns=node.ns.name)
    await until(serve.answering, 30)
    await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == 4, timeout=30)
    await serve.wait_log(lambda x: x.get("action") == "uevent" and "watching" in x["msg"])
    return serve, kubelet


def uevents(node: VethNode, ifname: str, count: int = 1) -> None:
    """``count`` real "change" uevents for a netdev, from inside its namespace (as udevadm trigger)."""
    script = f"for i in $(seq {count}); do echo change > /sys/class/net/{ifname}/uevent; done"
    subprocess.run(["ip", "netns", "exec", node.ns.name, "sh", "-c", script], check=True)


def test_enobufs_storm_then_resync_shows_the_final_link_state(spawn: Spawn, veth_node: VethNode,
                                                               sim_root: Path) -> None:
    """The agent is frozen while thousands of link changes overflow its netlink queue; on waking it
    gets ENOBUFS, resyncs from a full dump and reports the state the storm left behind."""
    peer0, peer1 = veth_node.peers
    pf0_vfs, pf1_vfs = veth_node.vfs_of(veth_node.pf_names[0]), veth_node.vfs_of(veth_node.pf_names[1])
    batch = sim_root / "storm.batch"
    lines = [f"link set {p} {state}" for _ in range(1500) for p in (peer0, peer1) for state in ("down", "up")]
    batch.write_text("\n".join([*lines, f"link set {peer0} down"]) + "\n")

    async def body() -> None:
        serve, kubelet = await serving(spawn, veth_node)
        serve.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            await asyncio.to_thread(veth_node.ns.ip, "-batch", str(batch))
        finally:
            serve.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        await serve.wait_log(lambda x: x.get("action") == "netlink-resync" and x.get("reason") == "enobufs")
        await kubelet.wait_for(lambda: sorted(kubelet.healthy(RESOURCE)) == sorted(pf1_vfs), timeout=30)
        assert serve.metric("sriov_rdma_netlink_resyncs_total", reason="enobufs") >= 1
        veth_node.ns.ip("link", "set", peer0, "up")
        await kubelet.wait_for(lambda: sorted(kubelet.healthy(RESOURCE)) == sorted(pf0_vfs + pf1_vfs),
                               timeout=30)
        assert serve.alive()
        await kubelet.stop()

    asyncio.run(body())


def test_a_vf_and_its_rdma_device_vanish_and_return(spawn: Spawn, veth_node: VethNode) -> None:
    pf0, pf1 = veth_node.pf_names
    vf = veth_node.vfs_of(pf0)[0]
    pf1_address = veth_node.sim.pf(pf1).pci_address

    async def body() -> None:
        serve, kubelet = await serving(spawn, veth_node)
        veth_node.sim.unprobe(vf)  # driver gone: the VF's netdev and RDMA device vanish
        uevents(veth_node, pf0)
        await kubelet.wait_for(lambda: kubelet.devices(RESOURCE)[vf].health == "Unhealthy", timeout=30)
        veth_node.sim.probe_vf(vf)
        uevents(veth_node, pf0)
        await kubelet.wait_for(lambda: vf in kubelet.healthy(RESOURCE), timeout=30)

        gone = veth_node.vfs_of(pf1)
        veth_node.sim.remove_vfs(pf1_address)  # the PCI functions themselves vanish ...
        uevents(veth_node, pf1)
        await kubelet.wait_for(lambda: not set(gone) & set(kubelet.devices(RESOURCE)), timeout=30)
        veth_node.sim.create_vfs(pf1_address, 2)  # ... and return
        uevents(veth_node, pf1)
        await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == 4, timeout=30)
        assert serve.alive()
        await kubelet.stop()

    asyncio.run(body())


def test_a_uevent_flood_over_garbage_in_sysfs_never_stops_serving(spawn: Spawn, veth_node: VethNode) -> None:
    """Binary bytes in one PF's sriov_numvfs, then 2,000 uevents: every rescan they cause meets the
    garbage. Whatever the readers make of it, the callback's failure is logged once and retried, the
    agent keeps answering Allocate and health, and it recovers when the file is sane again."""
    pf0, pf1 = veth_node.pf_names
    numvfs = veth_node.sim.device_dir(veth_node.sim.pf(pf1).pci_address) / "sriov_numvfs"
    vf = veth_node.vfs_of(pf0)[1]

    async def body() -> None:
        serve, kubelet = await serving(spawn, veth_node)
        numvfs.write_bytes(b"\xff\xfe\x00garbage\x80\n")
        flood = asyncio.create_task(asyncio.to_thread(uevents, veth_node, pf0, 2000))
        while not flood.done():
            resp = await kubelet.allocate(RESOURCE, [vf])  # served all through the flood
            assert resp.envs["PCIDEVICE_NVIDIA_COM_CX7_QSFP"] == vf
            await asyncio.sleep(0.05)
        await flood
        assert serve.alive(), serve.text()
        guard_errors = [x for x in serve.lines() if x.get("action") == "guard" and x["level"] == "error"]
        callbacks = [x.get("device") for x in guard_errors]  # each callback logs a reason once
        assert len(callbacks) == len(set(callbacks)), guard_errors
        numvfs.write_text("2\n")
        uevents(veth_node, pf1)
        await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == 4, timeout=60)
        assert serve.alive()
        raw = [line for line in serve.text().splitlines() if line and not line.startswith("{")]
        assert raw == [], raw  # every line a structured log line: nothing escaped to stderr
        await kubelet.stop()

    asyncio.run(body())
