"""Run the agent in the guest the way the daemon runs: ``agent.cli.serve`` with real settings, next to
the kubelet stand-ins (device manager and PodResources), stopped by SIGTERM as a pod is stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from agent.adapters.sysfs import FileWriter
from agent.app import HOST_WATCHERS, build_agent, load_config
from agent.cli import serve
from agent.settings import Settings
from agent.sim.kubelet import FakeKubelet
from agent.sim.podresources import FakePodResources

RESOURCE = "nvidia.com/cx7_qsfp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    kubelet: FakeKubelet
    pods: FakePodResources
    config_path: Path
    metrics_url: str
    settings: Settings

    def write_config(self, text: str) -> None:
        """Replace the config file atomically, as a ConfigMap update does (the agent reloads it)."""
        tmp = self.config_path.with_suffix(".new")
        tmp.write_text(text)
        tmp.rename(self.config_path)

    def health(self) -> dict[str, str]:
        return {i: d.health for i, d in self.kubelet.devices(RESOURCE).items()}

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """One scrape of the metrics endpoint: {(sample name, sorted labels): value}."""
        def get() -> bytes:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
                return bytes(r.read())
        text = (await asyncio.to_thread(get)).decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition that has no event of its own (kernel state), yielding to the agent.

    ``cond`` runs in a thread: pyroute2's synchronous IPRoute cannot run inside the event loop."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(cond):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def serve_drawn_node(settings: Settings, stop: asyncio.Event) -> int:
    """``cli.serve`` for a sysfs root that is not "/": the agent manages VFs there only when given a
    writer, and here the plain file writer is right, because the files it writes (sriov_numvfs and
    friends) are symlinks to the real kernel's. Otherwise the same wiring as ``cli.serve``."""
    agent = build_agent(settings, load_config(settings.config), writer=FileWriter(), watchers=HOST_WATCHERS)
    await agent.start_observability()
    runner = asyncio.create_task(agent.run())
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if runner in done:
        runner.result()
        return 1
    waiter.cancel()
    await agent.shutdown()
    return 0


@contextlib.asynccontextmanager
async def serving(sysfs_root: Path | str, config: str) -> AsyncIterator[Served]:
    """The agent serving ``config`` over ``sysfs_root``; on exit it is stopped and must exit 0.

    On the real root this is ``agent.cli.serve`` itself, stopped by SIGTERM."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    work = Path(tempfile.mkdtemp(prefix="agent-", dir="/tmp"))  # short: unix socket paths are capped
    cfg = work / "config.yaml"
    cfg.write_text(config)
    metrics = f"127.0.0.1:{free_port()}"
    settings = Settings(config=str(cfg), sysfs_root=str(sysfs_root), dev_root="/",
                        device_plugin_dir=str(work / "dp"), devinfo_dir=str(work / "devinfo"),
                        pod_resources_socket=str(work / "pod-resources" / "kubelet.sock"),
                        state_dir=str(work / "state"),
                        metrics_address=metrics, health_address=f"127.0.0.1:{free_port()}",
                        status_socket=str(work / "status.sock"), node_name="vm-node")
    (work / "dp").mkdir()
    kubelet = FakeKubelet(settings.device_plugin_dir)
    pods = FakePodResources(settings.pod_resources_socket)
    await kubelet.start()
    await pods.start()
    stop = asyncio.Event()
    real_root = Path(sysfs_root).resolve() == Path("/")
    agent = asyncio.create_task(serve(settings) if real_root else serve_drawn_node(settings, stop))
    try:
        await kubelet.wait_for(lambda: RESOURCE in kubelet.endpoints or agent.done(), timeout=60)
        if agent.done():
            raise AssertionError(f"agent exited at start: {agent.result()}")
        yield Served(kubelet, pods, cfg, f"http://{metrics}/metrics", settings)
    finally:
        if not agent.done():
            if real_root:
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                stop.set()
        code = await asyncio.wait_for(agent, 30)
        await pods.stop()
        await kubelet.stop()
        shutil.rmtree(work, ignore_errors=True)
        assert code == 0, f"agent exited {code}"
