"""VF hygiene on the simulated node, seen by the kubelet stand-in: a VF its pod released is fenced
(Unhealthy, "resetting"), put back to the baseline and only then Healthy again; an Allocate during the
reset is refused; a failed reset is retried; a restart finishes a reset the last run left fenced."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from agent.adapters.fencestore import FILE_NAME
from agent.app import App, build_agent
from agent.config import parse_config
from agent.core.reconcile import VfChange, stable_mac
from agent.model import VfAttrs
from agent.settings import Settings
from agent.sim.kernel import SimKernel, SimNetlink
from agent.sim.kubelet import HEALTHY, UNHEALTHY, FakeKubelet
from agent.sim.node import SimNode, dgx_spark
from agent.sim.podresources import FakePodResources, PodDevice
from tests.conftest import RESOURCE, node_settings

PF = "0002:01:00.0"
PF_IF = "enP2p1s0f0np0"
VF1 = "0002:01:00.3"  # index 1
NODE_NAME = "spark-1"
# What a pod (or a sriov-cni DEL that crashed half-way) leaves on the VF.
DIRTY = VfChange(mac="02:00:00:00:00:42", trust=True, link_state="disable", vlan=42, qos=3, min_tx_rate=0,
                 max_tx_rate=500)


def config(extra: str = "") -> str:
    lines = "".join(f"        {part.strip()}\n" for part in extra.split(",") if part.strip())
    return (f"resources:\n  - resourceName: {RESOURCE}\n    pfs:\n      - pfName: {PF_IF}\n"
            f"        numVfs: 4\n        mac: stable\n{lines}")


@dataclass
class Rig:
    node: SimNode
    kernel: SimKernel
    netlink: SimNetlink
    settings: Settings
    agent: App
    kubelet: FakeKubelet
    pods: FakePodResources

    def health(self, vf: str = VF1) -> str:
        d = self.kubelet.devices(RESOURCE).get(vf)
        return d.health if d else ""

    def reason(self, vf: str = VF1) -> str:
        return self.agent.hub.views[RESOURCE].by_id()[vf].reason

    def history(self, vf: str = VF1) -> list[str]:
        """The health of ``vf`` in every ListAndWatch message, repeats folded."""
        out: list[str] = []
        for _, devices in self.kubelet.endpoints[RESOURCE].updates:
            h = devices[vf].health if vf in devices else "absent"
            if not out or out[-1] != h:
                out.append(h)
        return out

    def attrs(self, index: int = 1) -> VfAttrs:
        return self.netlink.read_pf(PF_IF).vfs[index]

    async def until(self, cond: Callable[[], bool], timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.01)

    async def take(self, vf: str = VF1) -> None:
        """A pod gets the VF: Allocate, the kubelet lists it, sriov-cni moves its netdev and dirties it."""
        await self.kubelet.allocate(RESOURCE, [vf])
        self.pods.pods = [PodDevice("ml", "nccl-0", "main", RESOURCE, (vf,))]
        self.node.move_netdev_to_pod(self.node.vf_netdev_name(PF, self.node.vf_index(vf)))
        await self.agent.inventory.rescan("RTM_DELLINK (netdev moved into the pod)")
        self.netlink.set_vf(PF_IF, self.node.vf_index(vf), DIRTY)
        await self.until(lambda: self.agent.ledger.records[vf].confirmed)  # the kubelet listed it

    async def give_back(self, vf: str = VF1, pod_gone: bool = True) -> None:
        """sriov-cni DEL: the netdev comes home (the agent re-reads on the RTM_NEWLINK); then the kubelet
        stops listing the VF, as it does once the pod is gone."""
        self.node.move_netdev_home(vf)
        await self.agent.inventory.rescan("RTM_NEWLINK (netdev back in the host netns)")
        if pod_gone:
            self.pods.pods = []


@contextlib.asynccontextmanager
async def rig(sim_root: Path, extra: str = "", node: SimNode | None = None,
              kernel: SimKernel | None = None, listed: tuple[str, ...] = ()) -> AsyncIterator[Rig]:
    """The agent serving a simulated node; ``listed``: VFs PodResources lists from the start."""
    node = node or dgx_spark(sim_root / "node", numvfs=4)
    netlink = kernel.netlink if kernel is not None and kernel.netlink is not None else SimNetlink(node)
    kernel = kernel or SimKernel(node, netlink=netlink)
    settings = node_settings(node.root, node_name=NODE_NAME)
    Path(settings.config).write_text(config(extra))
    pods = FakePodResources(settings.pod_resources_socket)
    await pods.start()
    if listed:
        pods.pods = [PodDevice("ml", "nccl-0", "main", RESOURCE, listed)]
    kubelet = FakeKubelet(settings.device_plugin_dir)
    await kubelet.start()
    agent = build_agent(settings, parse_config(config(extra)), writer=kernel, netlink=netlink)
    runner = asyncio.create_task(agent.run())
    r = Rig(node, kernel, netlink, settings, agent, kubelet, pods)
    try:
        await kubelet.wait_for(lambda: RESOURCE in kubelet.endpoints
                               and len(kubelet.devices(RESOURCE)) == 4, timeout=15)
        yield r
    finally:
        await agent.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await kubelet.stop()
        await pods.stop()


def fence_file(settings: Settings) -> dict[str, str]:
    path = Path(settings.state_dir) / FILE_NAME
    return dict(json.loads(path.read_text())["vfs"]) if path.exists() else {}


def test_released_vf_is_fenced_reset_to_baseline_then_healthy(sim_root: Path) -> None:
    async def body() -> None:
        async with rig(sim_root) as r:
            await r.take()
            assert r.attrs().vlan == 42
            await r.give_back(pod_gone=False)
            # Netdev home while PodResources still lists the VF: fenced, and nothing written to it yet.
            await r.kubelet.wait_for(lambda: r.health() == UNHEALTHY)
            assert r.reason() == "resetting"
            assert (r.attrs().vlan, r.attrs().trust) == (42, True)
            r.pods.pods = []  # the pod is gone: the re-check after the event sees the release
            await r.kubelet.wait_for(lambda: r.health() == HEALTHY, timeout=15)
            assert r.history() == [HEALTHY, UNHEALTHY, HEALTHY]
            assert r.attrs() == VfAttrs(1, stable_mac(NODE_NAME, PF, 1), trust=False, spoofchk=False,
                                        link_state="auto", vlan=0, qos=0, min_tx_rate=0, max_tx_rate=0)
            assert r.agent.stats.get("vf_resets", pf=PF, mode="settings", outcome="ok") == 1
            count = r.agent.metrics.registry.get_sample_value(  # type: ignore[union-attr]
                "sriov_rdma_vf_reset_duration_seconds_count", {"mode": "settings"})
            assert count == 1
            assert r.kernel.resets == []  # settings only: no FLR
            assert fence_file(r.settings) == {}
            others = [d for d in r.kubelet.devices(RESOURCE) if d != VF1]
            assert all(r.history(d) == [HEALTHY] for d in others)  # nobody else was touched
    asyncio.run(body())


def test_allocate_during_a_reset_is_refused_with_the_reason(sim_root: Path) -> None:
    async def body() -> None:
        async with rig(sim_root, "resetOnRelease: flr") as r:
            await r.take()
            hang = r.kernel.hang_next(f"{VF1}/reset")  # the FLR takes its time
            await r.give_back()
            await r.until(hang.entered.is_set)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await r.kubelet.allocate(RESOURCE, [VF1])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "resetting" in (err.value.details() or "")
            assert r.health() == UNHEALTHY and fence_file(r.settings) == {VF1: PF}
            hang.release.set()
            await r.kubelet.wait_for(lambda: r.health() == HEALTHY, timeout=15)
            assert r.kernel.resets == [VF1]
            resp = await r.kubelet.allocate(RESOURCE, [VF1])  # offered again: allocatable
            assert resp.envs["PCIDEVICE_NVIDIA_COM_CX7_QSFP"] == VF1
    asyncio.run(body())


def test_failed_reset_stays_unhealthy_with_the_reason_and_is_retried(sim_root: Path) -> None:
    async def body() -> None:
        async with rig(sim_root, "resetOnRelease: flr") as r:
            await r.take()
            r.kernel.inject(VF1, "reset", errno.EIO)
            await r.give_back()
            await r.until(lambda: "failed" in r.reason())
            assert r.health() == UNHEALTHY
            assert "EIO" in r.reason() and "retry in 1s" in r.reason()
            assert r.agent.stats.get("vf_resets", pf=PF, mode="flr", outcome="failed") == 1
            doc = await r.agent.status.document()
            (row,) = [v for v in doc["vfs"] if v["vf"] == VF1]  # type: ignore[attr-defined]
            assert row["resetting"] and row["reason"].startswith("resetting: failed")
            await r.kubelet.wait_for(lambda: r.health() == HEALTHY, timeout=15)  # the retry, 1 s later
            assert r.kernel.resets == [VF1]
            assert r.agent.stats.get("vf_resets", pf=PF, mode="flr", outcome="ok") == 1
    asyncio.run(body())


def test_a_vf_left_fenced_by_a_restart_is_reset_again_at_start(sim_root: Path) -> None:
    node = dgx_spark(sim_root / "node", numvfs=4)
    kernel = SimKernel(node, netlink=SimNetlink(node))

    async def first() -> None:
        async with rig(sim_root, "resetOnRelease: flr", node=node, kernel=kernel) as r:
            await r.take()
            hang = r.kernel.hang_next(f"{VF1}/reset")
            await r.give_back()
            await r.until(hang.entered.is_set)
            assert fence_file(r.settings) == {VF1: PF}
        hang.release.set()  # the agent was stopped mid-reset; the kernel call ends on its own

    async def second() -> None:
        hang = kernel.hang_next(f"{VF1}/reset")  # hold the new reset, to see what the kubelet is told
        async with rig(sim_root, "resetOnRelease: flr", node=node, kernel=kernel) as r:
            first_list = r.kubelet.endpoints[RESOURCE].updates[0][1]
            assert first_list[VF1].health == UNHEALTHY  # fenced before the kubelet ever saw it
            await r.until(hang.entered.is_set)
            hang.release.set()
            await r.kubelet.wait_for(lambda: r.health() == HEALTHY, timeout=15)
            assert r.kernel.resets.count(VF1) == 2
            assert fence_file(r.settings) == {}

    asyncio.run(first())
    asyncio.run(second())


def test_a_fenced_vf_a_pod_holds_is_never_touched(sim_root: Path) -> None:
    node = dgx_spark(sim_root / "node", numvfs=4)
    state = Path(node_settings(node.root).state_dir)
    state.mkdir(parents=True)
    (state / FILE_NAME).write_text(json.dumps({"vfs": {VF1: PF}}))  # left fenced by a previous run ...

    async def body() -> None:
        # ... but the kubelet handed the VF to a pod meanwhile: the fence is lifted, nothing written.
        async with rig(sim_root, "resetOnRelease: flr", node=node, listed=(VF1,)) as r:
            await r.until(lambda: VF1 not in r.agent.fences)
            await r.kubelet.wait_for(lambda: r.health() == HEALTHY, timeout=15)
            assert r.agent.stats.get("vf_resets", pf=PF, mode="flr", outcome="skipped_held") == 1
            touched = [c for c in r.netlink.calls if c[0] == "set_vf" and c[2][0] == 1]  # type: ignore[index]
            assert r.kernel.resets == [] and touched == []  # (the reconcile set the free VFs' MACs)
            assert fence_file(r.settings) == {}
    asyncio.run(body())


def test_reset_on_release_none_leaves_the_vf_alone(sim_root: Path) -> None:
    async def body() -> None:
        async with rig(sim_root, "resetOnRelease: none") as r:
            await r.take()
            await r.give_back()
            await r.agent.ledger.refresh()  # the release is seen ...
            await r.agent.inventory.rescan("settle")
            assert r.history() == [HEALTHY]  # ... and nothing is fenced or written
            assert r.attrs().vlan == 42 and r.agent.stats.get("vf_resets", pf=PF, mode="none",
                                                              outcome="ok") == 0
    asyncio.run(body())
