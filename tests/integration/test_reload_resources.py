"""Config reload applies the resource set live; a VF a pod holds stays in its old resource until
the kubelet's PodResources says the pod let go of it."""

from __future__ import annotations

import asyncio
import time

from agent.config import parse_config
from agent.settings import Settings
from agent.sim.node import SimNode
from agent.sim.podresources import FakePodResources, PodDevice
from tests.conftest import RESOURCE, RunAgent

OTHER = "example.com/qsfp_b"
PF1 = "0002:01:00.1"


def config(first: list[str], second: list[str]) -> str:
    vfs = {"enP2p1s0f0np0": 4, "enP2p1s0f1np1": 2}

    def block(name: str, pfs: list[str]) -> str:
        lines = "".join(f"      - pfName: {pf}\n        numVfs: {vfs[pf]}\n" for pf in pfs)
        return f"  - resourceName: {name}\n    pfs:\n{lines}" if pfs else ""
    return "resources:\n" + block(RESOURCE, first) + block(OTHER, second)


def test_a_held_vf_moves_to_its_new_resource_once_released(sim_node: SimNode, sim_settings: Settings,
                                                           run_agent: RunAgent) -> None:
    sim_node.set_pf_link(PF1, True)
    pf1_vfs = sim_node.create_vfs(PF1, 2)

    async def body() -> None:
        pods = FakePodResources(sim_settings.pod_resources_socket)
        await pods.start()
        async with run_agent(sim_settings, config(["enP2p1s0f0np0"], ["enP2p1s0f1np1"])) as (agent, kubelet):
            agent.inventory.pin_poll_s = 0.1
            await kubelet.wait_for(lambda: sorted(kubelet.healthy(OTHER)) == pf1_vfs)
            await kubelet.allocate(OTHER, [pf1_vfs[0]])
            pods.pods = [PodDevice("ml", "p", "c", OTHER, (pf1_vfs[0],))]
            agent.resources.set_config(parse_config(config(["enP2p1s0f0np0", "enP2p1s0f1np1"], [])))
            await agent.inventory.rescan("config changed")
            assert agent.resources.pinned == {pf1_vfs[0]: (OTHER, PF1)} and OTHER in agent.resources.retired
            # Each resource's stream carries its own update: wait for both, in whichever order they land.
            await kubelet.wait_for(lambda: sorted(kubelet.devices(OTHER)) == [pf1_vfs[0]]
                                   and pf1_vfs[1] in kubelet.devices(RESOURCE), timeout=10)
            assert pf1_vfs[0] not in kubelet.devices(RESOURCE)
            await asyncio.sleep(0.5)  # polled a few times: the pod still holds it, nothing moves
            assert agent.resources.pinned and not kubelet.endpoints[OTHER].stopped
            pods.pods = []  # the pod is gone (and the Allocate is older than the grace period)
            agent.ledger.records[pf1_vfs[0]].at = time.time() - 3600
            await kubelet.wait_for(lambda: kubelet.endpoints[OTHER].stopped
                                   and pf1_vfs[0] in kubelet.healthy(RESOURCE), timeout=10)
            assert not agent.resources.pinned and not agent.resources.retired
            assert OTHER not in agent.plugins.lifecycles
        await pods.stop()

    asyncio.run(body())
