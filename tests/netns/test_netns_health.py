"""`ip link set ... down/up` on real veths turns the matching VFs Unhealthy/Healthy at the kubelet."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from agent.adapters.netlink import LinkWatcher
from agent.adapters.udev import DeviceEvent, UeventWatcher
from agent.app import App

from .conftest import RESOURCE, Netns, VethNode, agent_watching, seen

pytestmark = pytest.mark.netns


def test_pf_link_down_and_up_flips_exactly_its_vfs(veth_node: VethNode) -> None:
    pf0, pf1 = veth_node.pf_names
    vfs0, vfs1 = veth_node.vfs_of(pf0), veth_node.vfs_of(pf1)

    async def body() -> None:
        async with agent_watching(veth_node) as (agent, kubelet):
            assert set(seen(kubelet).values()) == {"Healthy"}

            veth_node.ns.ip("link", "set", pf0, "down")
            await kubelet.wait_for(lambda: all(seen(kubelet)[v] == "Unhealthy" for v in vfs0))
            assert all(seen(kubelet)[v] == "Healthy" for v in vfs1)  # the other PF's VFs are untouched
            assert agent.hub.current(RESOURCE)[1].by_id()[vfs0[0]].reason == f"PF {pf0} is admin-down"

            veth_node.ns.ip("link", "set", pf0, "up")
            await kubelet.wait_for(lambda: set(seen(kubelet).values()) == {"Healthy"})
            assert agent.stats.get("health_transitions", resource=RESOURCE, to="Unhealthy") == 2
            assert agent.stats.get("health_transitions", resource=RESOURCE, to="Healthy") == 2

    asyncio.run(body())


def test_carrier_loss_from_the_far_end_makes_vfs_unhealthy(veth_node: VethNode) -> None:
    """The cable case: our PF stays admin-up but loses carrier because the peer went away."""
    pf0 = veth_node.pf_names[0]
    vfs0 = veth_node.vfs_of(pf0)

    async def body() -> None:
        async with agent_watching(veth_node) as (agent, kubelet):
            veth_node.ns.ip("link", "set", veth_node.peers[0], "down")
            await kubelet.wait_for(lambda: all(seen(kubelet)[v] == "Unhealthy" for v in vfs0))
            assert agent.hub.current(RESOURCE)[1].by_id()[vfs0[0]].reason == f"PF {pf0} has no carrier"
            veth_node.ns.ip("link", "set", veth_node.peers[0], "up")
            await kubelet.wait_for(lambda: set(seen(kubelet).values()) == {"Healthy"})

    asyncio.run(body())


def test_a_flapping_link_is_reported_down_once_and_up_after_it_settles(veth_node: VethNode) -> None:
    pf0 = veth_node.pf_names[0]
    vf = veth_node.vfs_of(pf0)[0]

    async def body() -> None:
        async with agent_watching(veth_node, settle_s=0.5) as (agent, kubelet):
            ep = kubelet.endpoints[RESOURCE]
            start = len(ep.updates)
            for _ in range(5):
                veth_node.ns.ip("link", "set", pf0, "down")
                await kubelet.wait_for(lambda: seen(kubelet)[vf] == "Unhealthy")
                veth_node.ns.ip("link", "set", pf0, "up")
            await kubelet.wait_for(lambda: seen(kubelet)[vf] == "Healthy", timeout=5)
            history = [u[vf].health for _, u in ep.updates[start:]]
            # Down is pushed at once, every recovery inside the hold is swallowed: one Healthy at the end.
            assert history.count("Healthy") == 1 and history[-1] == "Healthy"
            # Each of the PF's two VFs went down once and came back once.
            assert agent.stats.get("health_transitions", resource=RESOURCE, to="Unhealthy") == 2
            assert agent.stats.get("health_transitions", resource=RESOURCE, to="Healthy") == 2

    asyncio.run(body())


def test_vf_netdev_moved_into_a_pod_netns_stays_healthy(veth_node: VethNode) -> None:
    """sriov-cni moves the allocated VF's netdev into the pod: the host loses it, health does not."""
    ns = veth_node.ns
    pf0 = veth_node.pf_names[0]
    vf = veth_node.vfs_of(pf0)[0]
    vf_netdev = veth_node.sim.vf_netdev_name(veth_node.sim.pf(pf0).pci_address, 0)
    ns.veth(vf_netdev, f"q{ns.tag}v0")
    pod = Netns(f"{ns.name}-pod", ns.tag)

    async def body() -> None:
        async with agent_watching(veth_node) as (agent, kubelet):
            resp = await kubelet.allocate(RESOURCE, [vf])
            assert resp.envs["PCIDEVICE_NVIDIA_COM_CX7_QSFP"] == vf
            assert _vf_netdev(agent, vf) == vf_netdev
            downs = agent.stats.get("health_transitions", resource=RESOURCE, to="Unhealthy")
            veth_node.sim.move_netdev_to_pod(vf_netdev)
            ns.ip("link", "set", vf_netdev, "netns", pod.name)
            # The link watcher saw the netdev leave and the agent re-read the node without it.
            await _until(lambda: _vf_netdev(agent, vf) is None)
            await asyncio.sleep(0.1)
            assert seen(kubelet)[vf] == "Healthy"
            assert agent.stats.get("health_transitions", resource=RESOURCE, to="Unhealthy") == downs

    subprocess.run(["ip", "netns", "add", pod.name], check=True)
    try:
        asyncio.run(body())
    finally:
        subprocess.run(["ip", "netns", "del", pod.name], check=False)


def test_link_watcher_follows_add_rename_and_delete(netns: Netns) -> None:
    a, b = f"w{netns.tag}a", f"w{netns.tag}b"

    async def body() -> None:
        watcher = LinkWatcher(netns=netns.name)
        reasons: list[str] = []
        changed = asyncio.Event()

        async def on_change(before: object, after: object, reason: str) -> None:
            reasons.append(reason)
            changed.set()

        task = asyncio.create_task(watcher.run(on_change))
        try:
            await asyncio.wait_for(watcher.synced.wait(), 5)
            assert set(watcher.by_name()) == {"lo"}
            netns.veth(a, b, up=False)
            await _until(lambda: {a, b} <= set(watcher.by_name()))
            index = watcher.by_name()[a].ifindex
            netns.ip("link", "set", a, "name", f"{a}x")
            await _until(lambda: f"{a}x" in watcher.by_name() and a not in watcher.by_name())
            assert watcher.by_name()[f"{a}x"].ifindex == index
            netns.ip("link", "del", f"{a}x")  # deletes the pair
            await _until(lambda: set(watcher.by_name()) == {"lo"})
            assert any(a in r for r in reasons)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(body())


def test_enobufs_recreates_the_socket_and_resyncs(netns: Netns) -> None:
    """A tiny receive buffer and a storm while the loop is busy make the kernel drop messages."""
    pairs = [(f"s{netns.tag}{i:02d}", f"t{netns.tag}{i:02d}") for i in range(8)]
    for x, y in pairs:
        netns.veth(x, y, up=False)

    async def body() -> None:
        watcher = LinkWatcher(netns=netns.name, rcvbuf=4096)

        async def on_change(before: object, after: object, reason: str) -> None:
            return None

        task = asyncio.create_task(watcher.run(on_change))
        try:
            await asyncio.wait_for(watcher.synced.wait(), 5)
            # The loop is blocked while `ip -batch` flips every link 10 times: nothing is read.
            script = "".join(f"link set {x} up\nlink set {x} down\n" for _ in range(10) for x, _ in pairs)
            script += "".join(f"link set {x} up\n" for x, _ in pairs[:4])
            subprocess.run(["ip", "-n", netns.name, "-batch", "-"], input=script, text=True, check=True)
            await _until(lambda: watcher.stats.get("netlink_resyncs", reason="enobufs") >= 1)
            expected_up = {x for x, _ in pairs[:4]}
            await _until(lambda: {n for n, o in watcher.by_name().items()
                                  if o.admin_up and n != "lo"} == expected_up)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(body())


def test_periodic_resync_is_quiet_when_nothing_was_missed(netns: Netns) -> None:
    netns.veth(f"r{netns.tag}a", f"r{netns.tag}b")

    async def body() -> None:
        watcher = LinkWatcher(netns=netns.name, resync_s=0.1)
        reasons: list[str] = []

        async def on_change(before: object, after: object, reason: str) -> None:
            reasons.append(reason)

        task = asyncio.create_task(watcher.run(on_change))
        try:
            await _until(lambda: watcher.stats.get("netlink_resyncs", reason="periodic") >= 3)
            assert reasons == ["netlink resync (start)"]  # same table each time: no callback
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(body())


def test_kernel_uevents_for_net_devices_arrive_in_the_namespace(netns: Netns) -> None:
    a, b = f"u{netns.tag}a", f"u{netns.tag}b"

    async def body() -> None:
        watcher = UeventWatcher(source="kernel", netns=netns.name)
        got: list[DeviceEvent] = []

        async def on_events(events: list[DeviceEvent], overflowed: bool) -> None:
            got.extend(events)

        task = asyncio.create_task(watcher.run(on_events))
        try:
            await asyncio.wait_for(watcher.ready.wait(), 5)
            netns.veth(a, b, up=False)
            await _until(lambda: {e.name for e in got if e.action == "add"} >= {a, b})
            netns.ip("link", "del", a)
            await _until(lambda: {e.name for e in got if e.action == "remove"} >= {a, b})
            assert all(e.subsystem == "net" and e.virtual for e in got)
            assert not got[0].matters({"enP2p1s0f0np0"}) and got[0].matters({got[0].name})
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(body())


def _vf_netdev(agent: App, vf: str) -> str | None:
    found = agent.inventory.node.vf(vf)
    assert found is not None
    netdev = found[1].netdev
    return netdev.name if netdev else None


async def _until(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
