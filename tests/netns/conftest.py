"""Real kernel netlink for the health tests: a throw-away network namespace with veth pairs.

Every namespace has a unique name and is deleted (with its veths) when the test ends, pass or fail.
The simulated sysfs tree names its PF netdevs after the veths, so the agent reads PCI, driver and
RDMA facts from sysfs and the link state from the real kernel, exactly as it does on a node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from agent.app import App, Watchers, build_agent
from agent.config import HealthSettings, parse_config
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import SimNode, SimPf
from tests.conftest import node_settings

RESOURCE = "nvidia.com/cx7_qsfp"


def _usable() -> str:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    return ""


@dataclass
class Netns:
    """A network namespace for one test; ``ip(...)`` runs `ip -n <name> ...` and fails loudly."""

    name: str
    tag: str
    veths: list[str] = field(default_factory=list)

    def ip(self, *args: str) -> str:
        return subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True,
                              text=True).stdout

    def veth(self, name: str, peer: str, up: bool = True) -> None:
        self.ip("link", "add", name, "type", "veth", "peer", "name", peer)
        self.veths.append(name)
        if up:
            self.ip("link", "set", name, "up")
            self.ip("link", "set", peer, "up")


@pytest.fixture
def netns() -> Iterator[Netns]:
    problem = _usable()
    if problem:
        pytest.skip(problem)
    tag = uuid.uuid4().hex[:6]
    ns = Netns(f"sriovh-{tag}", tag)
    subprocess.run(["ip", "netns", "add", ns.name], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns.name], check=False)


@dataclass
class VethNode:
    """Two simulated CX-7 PFs whose netdevs are real veths (up) in ``ns``, 2 VFs each, one resource."""

    ns: Netns
    sim: SimNode
    pf_names: tuple[str, str]
    peers: tuple[str, str]

    def vfs_of(self, pf_name: str) -> list[str]:
        pf = self.sim.pf(pf_name)
        return [self.sim.vf_address(pf.pci_address, i) for i in range(pf.numvfs)]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir: unix socket paths must stay under 108 bytes, pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="sriovh-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def veth_node(netns: Netns, short_tmp: Path) -> VethNode:
    names = (f"h{netns.tag}f0np0", f"h{netns.tag}f1np1")
    peers = (f"p{netns.tag}f0", f"p{netns.tag}f1")
    for name, peer in zip(names, peers, strict=True):
        netns.veth(name, peer)
    sim = SimNode(root=short_tmp, pfs=[
        SimPf("0002:01:00.0", names[0], numvfs=2),
        SimPf("0002:01:00.1", names[1], numvfs=2, sriov_offset=9),
    ]).build()
    return VethNode(netns, sim, names, peers)


def config_for(node: VethNode) -> str:
    pfs = "".join(f"      - pfName: {n}\n        numVfs: 2\n" for n in node.pf_names)
    return f"resources:\n  - resourceName: {RESOURCE}\n    pfs:\n{pfs}"


@contextlib.asynccontextmanager
async def agent_watching(node: VethNode, settle_s: float = 0.2) -> AsyncIterator[tuple[App, FakeKubelet]]:
    """The real agent with its link watcher bound in the test namespace, and a kubelet stand-in."""
    settings = node_settings(node.sim.root)
    kubelet = FakeKubelet(settings.device_plugin_dir)
    await kubelet.start()
    config = replace(parse_config(config_for(node)), health=HealthSettings(recovery_s=settle_s))
    agent = build_agent(settings, config, watchers=Watchers(uevents=False, netns=node.ns.name))
    runner = asyncio.create_task(agent.run())
    try:
        await kubelet.wait_for(lambda: len(seen(kubelet)) == 4, timeout=10)
        yield agent, kubelet
    finally:
        await agent.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await kubelet.stop()


def seen(kubelet: FakeKubelet) -> dict[str, str]:
    """Device ID -> health as the kubelet stand-in last received it on ListAndWatch."""
    ep = kubelet.endpoints.get(RESOURCE)
    return {i: d.health for i, d in ep.devices.items()} if ep else {}
