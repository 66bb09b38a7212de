"""A simulated DGX Spark node and the real agent over it, for the observability tests."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.app import App, build_agent
from agent.config import parse_config
from agent.core.status import PodRef
from agent.demo import DEMO_CONFIG, demo_settings
from agent.errors import AgentError
from agent.sim.node import SimNode, dgx_spark

RESOURCE = "nvidia.com/cx7_qsfp"
PF = "0002:01:00.0"
CONFIG = DEMO_CONFIG


@dataclass
class Node:
    root: Path
    sim: SimNode
    agent: App

    def rescan(self) -> None:
        asyncio.run(self.agent.inventory.rescan("test"))

    def port_file(self, pf: str, group: str, name: str) -> Path:
        return self.root / "sys/class/infiniband" / self.sim.rdma_name(pf) / "ports/1" / group / name

    def vf_stat(self, netdev: str, name: str) -> Path:
        return self.root / "sys/class/net" / netdev / "statistics" / name


def make_node(root: Path, config: str = CONFIG, metrics_address: str = "", health_address: str = "") -> Node:
    sim = dgx_spark(root)
    (root / "config.yaml").write_text(config)
    agent = build_agent(demo_settings(root, metrics_address, health_address), parse_config(config))
    return Node(root, sim, agent)


class FixedPods:
    """A PodDirectory answering from a dict, or failing like an unreachable kubelet."""

    def __init__(self, owners: Mapping[tuple[str, str], PodRef] | None) -> None:
        self.owners = owners
        self.calls = 0

    async def device_owners(self) -> Mapping[tuple[str, str], PodRef]:
        self.calls += 1
        if self.owners is None:
            raise AgentError("connect to /var/lib/kubelet/pod-resources/kubelet.sock: No such file")
        return self.owners
