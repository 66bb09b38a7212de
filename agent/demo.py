"""`sriov-rdma-agent demo`: the real agent on a simulated DGX Spark, seen through a kubelet stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.app import App, build_agent
from agent.config import parse_config
from agent.core.inventory import devinfo_file_name
from agent.settings import Settings
from agent.sim.kernel import SimKernel, SimNetlink
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import SimNode, dgx_spark

RESOURCE = "nvidia.com/cx7_qsfp"
DEMO_CONFIG = f"""\
resources:
  - resourceName: {RESOURCE}
    pfs:
      - pfName: enP2p1s0f0np0
        numVfs: 4
"""


def demo_settings(root: Path, metrics_address: str = "", health_address: str = "",
                  **overrides: Any) -> Settings:
    """Settings with every host path under ``root`` (sys/, dev/, var/...), as the kubelet lays them out."""
    return replace(Settings(
        config=str(root / "config.yaml"),
        sysfs_root=str(root),
        dev_root=str(root),
        device_plugin_dir=str(root / "var/lib/kubelet/device-plugins"),
        devinfo_dir=str(root / "var/run/k8s.cni.cncf.io/devinfo/dp"),
        pod_resources_socket=str(root / "var/lib/kubelet/pod-resources/kubelet.sock"),
        state_dir=str(root / "var/run/sriov-rdma-agent"),
        metrics_address=metrics_address,
        health_address=health_address,
        status_socket=str(root / "run/sriov-rdma-agent/status.sock"),
    ), **overrides)


def run_demo(once: bool = False, metrics_address: str = "", health_address: str = "") -> int:
    # tmpfs when there is one: the ~900 files of the simulated sysfs take seconds on some VM disks.
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="sriov-rdma-demo-", dir=shm) as tmp:
        return asyncio.run(_demo(Path(tmp), once, metrics_address, health_address))


async def _demo(root: Path, once: bool, metrics_address: str, health_address: str) -> int:
    node = dgx_spark(root, numvfs=0)  # a freshly booted node: the agent creates the VFs
    netlink = SimNetlink(node)
    kernel = SimKernel(node, netlink=netlink)
    (root / "config.yaml").write_text(DEMO_CONFIG)
    settings = demo_settings(root, metrics_address, health_address)
    kubelet = FakeKubelet(settings.device_plugin_dir)
    await kubelet.start()
    agent = build_agent(settings, parse_config(DEMO_CONFIG), writer=kernel, netlink=netlink)
    if not once:
        await agent.start_observability()  # before run(), so probes see NOT_SERVING until ready
    runner = asyncio.create_task(agent.run())
    try:
        await kubelet.wait_for(lambda: bool(kubelet.devices(RESOURCE)), timeout=10)
        print_node(node, root)
        writes = ", ".join(f"{v} > /sys/{p}" for p, v in kernel.writes)
        print(f"  (booted with 0 VFs; the agent's start-up reconcile wrote: {writes})")
        print_kubelet_view(kubelet, agent)
        await print_allocation(kubelet, agent)
        if not once:
            print_endpoints(agent)
            print("\nServing. The kubelet stand-in keeps its ListAndWatch stream open; Ctrl-C to stop.")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
    finally:
        await agent.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await kubelet.stop()
    return 0


def print_endpoints(agent: App) -> None:
    if agent.metrics_server is not None:
        m = agent.metrics_server
        print(f"\nMetrics: curl http://{m.host}:{m.port}/metrics")
    if agent.health is not None:
        h = agent.health
        print(f"Health:  grpc.health.v1 on {h.host}:{h.port} (\"\", deviceplugin, lifecycle, monitor)")
    if agent.status_server is not None:
        print(f"Status:  sriov-rdma-agent status --status-socket {agent.status_server.socket_path}")


def print_node(node: SimNode, root: Path) -> None:
    print(f"Simulated node (DGX Spark ConnectX-7, mlx5) under {root}")
    print(f"  {'PF':<15}{'netdev':<16}{'link':<6}{'VFs':<8}")
    for pf in node.pfs:
        print(f"  {pf.pci_address:<15}{pf.netdev:<16}{'up' if pf.link_up else 'down':<6}"
              f"{pf.numvfs}/{pf.totalvfs}")


def print_kubelet_view(kubelet: FakeKubelet, agent: App) -> None:
    ep = kubelet.endpoints[RESOURCE]
    print(f"\nWhat the kubelet sees for {RESOURCE} (registered via {ep.socket}):")
    print(f"  {'device ID':<15}{'health':<11}{'NUMA':<6}{'VF netdev':<17}{'RDMA':<9}{'uverbs':<9}")
    for dev_id, d in sorted(ep.devices.items()):
        found = agent.inventory.node.vf(dev_id)
        vf = found[1] if found else None
        netdev = vf.netdev.name if vf and vf.netdev else "-"
        rdma = vf.rdma.name if vf and vf.rdma else "-"
        uverbs = vf.rdma.uverbs if vf and vf.rdma and vf.rdma.uverbs else "-"
        numa = ",".join(map(str, d.numa)) or "-"
        print(f"  {dev_id:<15}{d.health:<11}{numa:<6}{netdev:<17}{rdma:<9}{uverbs:<9}")
    print(f"  allocatable: {len(kubelet.healthy(RESOURCE))} of {len(ep.devices)}")


async def print_allocation(kubelet: FakeKubelet, agent: App) -> None:
    healthy = kubelet.healthy(RESOURCE)
    pick = await kubelet.preferred(RESOURCE, healthy, [], 1)
    resp = await kubelet.allocate(RESOURCE, pick)
    print(f"\nAllocate({pick[0]}) -> what a pod with {RESOURCE}: 1 gets:")
    for k, v in sorted(resp.envs.items()):
        print(f"  env {k}={v}")
    for d in resp.devices:
        print(f"  device {d.host_path} -> {d.container_path} ({d.permissions})")
    f = Path(agent.settings.devinfo_dir) / devinfo_file_name(RESOURCE, pick[0])  # there since start-up
    print(f"  device-info {f.name}: {f.read_text()}")
