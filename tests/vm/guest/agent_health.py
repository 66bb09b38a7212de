"""The agent (``sriov-rdma-agent serve``'s code path) on a real kernel: RDMA health from Soft-RoCE over
virtio-net as the kubelet stand-in sees it, and the rxe hw_counters on the metrics endpoint."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from agentrun import RESOURCE, serving
from guestlib import read, run

from agent.sim.kubelet import HEALTHY, UNHEALTHY


def config(pf_addr: str) -> str:
    return f"""\
resources:
  - resourceName: {RESOURCE}
    pfs:
      - pciAddress: "{pf_addr}"
        externallyManaged: true
"""


def port_state(rdma: str) -> str:
    return read(Path("/sys/class/infiniband", rdma, "ports/1/state"))


def test_rdma_link_down_and_up_reach_the_kubelet(roce_node: tuple[Path, str, list[tuple[str, str]]]) -> None:
    root, pf_addr, vfs = roce_node
    vf_ids = sorted(f"{pf_addr.rsplit('.', 1)[0]}.{i + 1}" for i in range(len(vfs)))
    uplink = Path(root, "sys/bus/pci/devices", pf_addr, "net").iterdir().__next__().name

    async def body() -> None:
        async with serving(root, config(pf_addr)) as served:
            kubelet, health = served.kubelet, served.health
            await kubelet.wait_for(lambda: health() == dict.fromkeys(vf_ids, HEALTHY), timeout=30)

            # The NIC goes down: the kernel takes every rxe port DOWN; the kubelet hears Unhealthy.
            t0 = time.monotonic()
            assert run("ip", "link", "set", uplink, "down").returncode == 0
            await kubelet.wait_for(lambda: health() == dict.fromkeys(vf_ids, UNHEALTHY), timeout=15)
            print(f"link down -> Unhealthy in the kubelet: {time.monotonic() - t0:.2f}s")
            assert port_state("rxe0") == "1: DOWN"

            t0 = time.monotonic()
            assert run("ip", "link", "set", uplink, "up").returncode == 0
            await kubelet.wait_for(lambda: health() == dict.fromkeys(vf_ids, HEALTHY), timeout=30)
            print(f"link up -> Healthy in the kubelet: {time.monotonic() - t0:.2f}s (with the settle time)")
            assert port_state("rxe0") == "4: ACTIVE"

            # One VF's RoCE port goes DOWN (its netdev is taken down): only that VF turns Unhealthy.
            vf_netdev, vf_rdma = vfs[1]
            assert run("ip", "link", "set", vf_netdev, "down").returncode == 0
            await kubelet.wait_for(lambda: health() == {vf_ids[0]: HEALTHY, vf_ids[1]: UNHEALTHY}, timeout=15)
            assert port_state(vf_rdma) == "1: DOWN"
            assert run("ip", "link", "set", vf_netdev, "up").returncode == 0
            await kubelet.wait_for(lambda: health() == dict.fromkeys(vf_ids, HEALTHY), timeout=30)

    asyncio.run(body())


def test_metrics_carry_real_rxe_hw_counters(roce_node: tuple[Path, str, list[tuple[str, str]]]) -> None:
    root, pf_addr, _ = roce_node
    uplink = Path(root, "sys/bus/pci/devices", pf_addr, "net").iterdir().__next__().name
    # A real link flap: rxe counts it in hw_counters/link_downed.
    assert run("ip", "link", "set", uplink, "down").returncode == 0
    assert run("ip", "link", "set", uplink, "up").returncode == 0
    counters = Path("/sys/class/infiniband/rxe0/ports/1/hw_counters")

    async def body() -> None:
        async with serving(root, config(pf_addr)) as served:
            scraped = await served.metrics()
        samples = {(name, dict(labels).get("device")): v for (name, labels), v in scraped.items()}
        downed = int(read(counters / "link_downed"))
        assert downed >= 1
        assert samples[("sriov_rdma_infiniband_hw_link_downed_total", "rxe0")] == downed
        sent = int(read(counters / "sent_pkts"))
        assert samples[("sriov_rdma_infiniband_hw_sent_pkts_total", "rxe0")] == sent
        assert samples[("sriov_rdma_infiniband_state_id", "rxe0")] == 4

    asyncio.run(body())
