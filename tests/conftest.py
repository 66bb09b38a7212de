"""Fixtures every tier can use: a simulated DGX Spark node, settings pointing into it, and a way to
run the real App next to the kubelet stand-in on real unix sockets.

Tests are plain functions that call ``asyncio.run`` on their async body; ``run_agent`` is an async
context manager factory for that body::

    def test_x(sim_settings, run_agent):
        async def body():
            async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
                await kubelet.wait_for(lambda: bool(kubelet.devices(RESOURCE)))
        asyncio.run(body())
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.app import App, build_agent
from agent.config import Config, parse_config
from agent.demo import DEMO_CONFIG, demo_settings
from agent.settings import Settings
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import SimNode, dgx_spark

RESOURCE = "nvidia.com/cx7_qsfp"
# The DGX Spark's cabled port, as the demo and the README use it.
CX7_CONFIG = DEMO_CONFIG  # the canonical config: 4 VFs on the DGX Spark's QSFP port


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (for metrics/health servers under test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def node_settings(root: Path, **overrides: Any) -> Settings:
    """Settings whose every path lives under ``root`` (sys/, dev/, var/...); no metrics/health ports."""
    return demo_settings(root, **overrides)


@pytest.fixture
def sim_root() -> Iterator[Path]:
    """A fresh, short directory on tmpfs for a simulated node.

    Short, because unix socket paths (the device-plugin dir lives under the node root) are capped
    at 107 bytes; tmpfs, because creating the ~900 sysfs files of a node on the VM's ext4 costs
    seconds, on tmpfs tens of milliseconds.
    """
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="sra-", dir=base))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sim_node(sim_root: Path) -> SimNode:
    """A DGX Spark ConnectX-7 node (4 PFs, 4 VFs on enP2p1s0f0np0) under sim_root/node."""
    return dgx_spark(sim_root / "node")


@pytest.fixture
def sim_settings(sim_node: SimNode) -> Settings:
    return node_settings(sim_node.root)


RunAgent = Callable[..., contextlib.AbstractAsyncContextManager[tuple[App, FakeKubelet]]]


@contextlib.asynccontextmanager
async def _run_agent(settings: Settings, config: Config | str, *, start_kubelet: bool = True,
                     wait_registered: bool = True,
                     timeout: float = 5.0) -> AsyncIterator[tuple[App, FakeKubelet]]:
    """The real App (App.run) and a FakeKubelet in the running loop; both stopped on exit.

    With ``start_kubelet=False`` the kubelet stand-in exists but is not serving: start it later
    with ``await kubelet.start()``. ``wait_registered`` waits until the kubelet holds a device list
    for every configured resource.
    """
    cfg = parse_config(config) if isinstance(config, str) else config
    kubelet = FakeKubelet(settings.device_plugin_dir)
    if start_kubelet:
        await kubelet.start()
    agent = build_agent(settings, cfg)
    runner = asyncio.create_task(agent.run())
    try:
        if start_kubelet and wait_registered:
            names = [r.resource_name for r in cfg.resources]
            await kubelet.wait_for(lambda: all(n in kubelet.endpoints and kubelet.endpoints[n].updates
                                               for n in names), timeout=timeout)
        yield agent, kubelet
    finally:
        await agent.shutdown()
        runner.cancel()  # shutdown() cancels a run() that has begun; this one may not have yet
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await kubelet.await_disconnects()
        await kubelet.stop()


@pytest.fixture
def run_agent() -> RunAgent:
    return _run_agent
