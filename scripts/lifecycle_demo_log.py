#!/usr/bin/env python3
"""Regenerate docs/lifecycle-demo-log.txt: the VF lifecycle on a simulated DGX Spark, as its log shows it.

    .venv/bin/python scripts/lifecycle_demo_log.py > docs/lifecycle-demo-log.txt

Runs the real agent (Agent.run, device-plugin gRPC, kubelet and PodResources stand-ins on unix sockets)
over a simulated node whose sysfs writes are answered by the kernel-faithful SimKernel, and walks through:
  1. a freshly booted node (0 VFs): the startup reconcile creates 4 before the kubelet is served;
  2. the ConfigMap is updated to 8: 4 -> 0 -> 8, the kubelet sees 8;
  3. a pod holds a VF (PodResources says so) and the ConfigMap asks for 2: refused, nothing written;
  4. the agent restarts over the node in its desired state: nothing is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from agent.app import Agent, build_agent
from agent.config import parse_config
from agent.demo import demo_settings
from agent.logs import setup_logging
from agent.settings import Settings
from agent.sim.kernel import SimKernel, SimNetlink
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import dgx_spark
from agent.sim.podresources import FakePodResources, PodDevice

RESOURCE = "nvidia.com/cx7_qsfp"
PF = "0002:01:00.0"


def config(numvfs: int) -> str:
    return (f"resources:\n  - resourceName: {RESOURCE}\n    pfs:\n      - pfName: enP2p1s0f0np0\n"
            f"        numVfs: {numvfs}\n        mac: stable\n        trust: true\n")


def publish(cm: Path, text: str, version: int) -> None:
    """Update a mounted ConfigMap the way the kubelet does: a new dir, then an atomic ..data swap."""
    new = cm / f"..2026_11_23_{version:02d}"
    new.mkdir()
    (new / "config.yaml").write_text(text)
    os.symlink(new.name, cm / "..data_tmp")
    os.replace(cm / "..data_tmp", cm / "..data")


def say(text: str) -> None:
    print(f"\n===== {text}", flush=True)


@contextlib.asynccontextmanager
async def agent_running(settings: Settings, kernel: SimKernel, netlink: SimNetlink,
                        kubelet: FakeKubelet) -> AsyncIterator[Agent]:
    cfg = parse_config(Path(settings.config).read_text())
    agent = build_agent(settings, cfg, writer=kernel, netlink=netlink)
    registrations = len(kubelet.registrations)
    runner = asyncio.create_task(agent.run())
    await kubelet.wait_for(lambda: len(kubelet.registrations) > registrations
                           and bool(kubelet.endpoints[RESOURCE].updates))
    try:
        yield agent
    finally:
        await agent.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def until(predicate: object, timeout: float = 20.0) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("the demo did not reach the expected state")
        await asyncio.sleep(0.02)


def numvfs_writes(kernel: SimKernel) -> list[str]:
    return [v for p, v in kernel.writes if p.endswith(f"{PF}/sriov_numvfs")]


async def main(root: Path) -> None:
    node = dgx_spark(root / "node", numvfs=0)
    netlink = SimNetlink(node)
    # VFs appear 50 ms after the write returns and are probed 100 ms later, like udev-renamed mlx5 VFs.
    kernel = SimKernel(node, netlink=netlink, vf_delay=0.05, probe_delay=0.1)
    cm = root / "configmap"
    cm.mkdir()
    os.symlink("..data/config.yaml", cm / "config.yaml")
    publish(cm, config(4), 1)
    settings = demo_settings(node.root, config=str(cm / "config.yaml"), node_name="spark-1")
    kubelet = FakeKubelet(settings.device_plugin_dir)
    pods = FakePodResources(settings.pod_resources_socket)
    await kubelet.start()
    await pods.start()
    try:
        say(f"1. freshly booted node: {PF} has sriov_numvfs=0, sriov_totalvfs=8; config asks for 4")
        async with agent_running(settings, kernel, netlink, kubelet) as agent:
            first = kubelet.endpoints[RESOURCE].updates[0][1]
            say(f"kubelet's first device list: {len(first)} devices; healthy now: "
                f"{len(kubelet.healthy(RESOURCE))}; sriov_numvfs writes so far: {numvfs_writes(kernel)}")

            say("2. ConfigMap updated to numVfs: 8 (atomic ..data swap)")
            publish(cm, config(8), 2)
            await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == 8, timeout=20)
            await until(lambda: agent.reconcile_status[PF].actual_vfs == 8)
            say(f"kubelet sees {len(kubelet.healthy(RESOURCE))} healthy devices; sriov_numvfs writes: "
                f"{numvfs_writes(kernel)} (8 went through 0)")

            say("3. pod ml/nccl-0 holds VF 0002:01:00.4 (kubelet PodResources); ConfigMap asks for numVfs: 2")
            pods.pods = [PodDevice("ml", "nccl-0", "main", RESOURCE, ("0002:01:00.4",))]
            before = len(kernel.writes)
            publish(cm, config(2), 3)
            await until(lambda: agent.reconcile_status[PF].state == "refused")
            st = agent.reconcile_status[PF]
            errors = agent.stats.get("reconcile_errors", pf=PF, reason="vf_in_use")
            say(f"status {PF}: state={st.state} reason={st.reason} desired={st.desired_vfs} "
                f"actual={st.actual_vfs}; reconcile_errors{{reason=vf_in_use}}={errors:g}; "
                f"sysfs writes during the refusal: {len(kernel.writes) - before}; "
                f"kubelet still sees {len(kubelet.healthy(RESOURCE))} healthy devices")
            publish(cm, config(8), 4)  # the operator reverts the ConfigMap
            await until(lambda: agent.reconcile_status[PF].state == "ok")

        say("4. agent restart over the node in its desired state (8 VFs, stable MACs, trust on)")
        writes, calls = len(kernel.writes), len(netlink.calls)
        async with agent_running(settings, kernel, netlink, kubelet) as agent:
            await until(lambda: PF in agent.reconcile_status)
            st = agent.reconcile_status[PF]
            say(f"after restart: state={st.state}, actions applied={st.actions_applied}, new sysfs writes="
                f"{len(kernel.writes) - writes}, new netlink changes={len(netlink.calls) - calls}, "
                f"kubelet sees {len(kubelet.healthy(RESOURCE))} healthy devices")
    finally:
        await pods.stop()
        await kubelet.stop()


if __name__ == "__main__":
    setup_logging("text", "info", stream=sys.stdout)
    logging.getLogger("agent.adapters.kubelet").setLevel(logging.WARNING)  # registration chatter
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="sra-demo-", dir=shm) as tmp:
        asyncio.run(main(Path(tmp)))
