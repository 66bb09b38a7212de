"""What `serve` loads: a node without VF netlink work never pays for pyroute2 or pyudev, one without
metrics never for prometheus_client.

pyroute2's package import loads all of it (~11 MiB resident, a third of start-up before
registration); pyudev loads libudev. The agent imports them only where they do work: VF settings
and reconcile observation on a real node (pyroute2), a udevd socket in /run/udev (pyudev).
`serve` never loads the simulator (agent.sim, agent.demo) or doctor, and an observe-only agent (a
simulated node without a kernel emulation) not VF hygiene either; the VF lifecycle module loads on
every node, since it also watches the config for hot reload.
The real process runs with ``-X importtime``, which names every module it imports on stderr.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

from agent.adapters.status_server import fetch_status
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import SimNode
from agent.sim.podresources import FakePodResources, PodDevice
from tests.conftest import CX7_CONFIG, RESOURCE, free_port


def _imported(stderr: str) -> set[str]:
    """Module names from -X importtime lines ("import time: self | cumulative | <indent>name")."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def test_serving_without_vf_settings_loads_neither_pyroute2_nor_pyudev(sim_node: SimNode,
                                                                      sim_root: Path) -> None:
    config = sim_root / "agent.yaml"
    config.write_text(CX7_CONFIG)
    plugin_dir = sim_node.root / "var/lib/kubelet/device-plugins"
    metrics = f"127.0.0.1:{free_port()}"

    async def body() -> str:
        kubelet = FakeKubelet(str(plugin_dir))
        await kubelet.start()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-X", "importtime", "-m", "agent", "serve", "--config", str(config),
            "--sysfs-root", str(sim_node.root), "--dev-root", str(sim_node.root),
            "--device-plugin-dir", str(plugin_dir), "--devinfo-dir", str(sim_root / "devinfo"),
            "--pod-resources-socket", str(sim_root / "pod-resources.sock"),
            "--state-dir", str(sim_root / "state"), "--status-socket", str(sim_root / "status.sock"),
            "--metrics-address", metrics, "--health-address", f"127.0.0.1:{free_port()}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            # Serving, listing, allocating and scraping: every path a node without VF settings runs.
            await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == 4, timeout=30)
            await kubelet.allocate(RESOURCE, ["0002:01:00.2"])
            scrape = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10).read())
            assert b'"0002:01:00.2"' in scrape  # per-VF series: the collector read the node
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 20)
            assert proc.returncode == 0, err.decode()
            return err.decode()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await kubelet.stop()

    imported = _imported(asyncio.run(body()))
    assert {"grpc", "agent.adapters.netlink", "agent.adapters.udev"} <= imported  # the check sees imports
    # The lifecycle module itself loads (config hot reload runs on every node), VF hygiene only where
    # VFs are written, pyroute2 only when a VF setting or a real node's reconcile needs it.
    unwanted = ("pyroute2", "agent.sim", "agent.demo", "agent.services.hygiene", "agent.doctor")
    assert not {m for m in imported if m.startswith(unwanted)}
    if not os.path.exists("/run/udev/control"):  # with udevd visible, pyudev's monitor is the source
        assert not {m for m in imported if m.startswith("pyudev")}


def test_serving_without_metrics_loads_no_prometheus_client_and_status_still_names_pods(
        sim_node: SimNode, sim_root: Path) -> None:
    config = sim_root / "agent.yaml"
    config.write_text(CX7_CONFIG)
    plugin_dir = sim_node.root / "var/lib/kubelet/device-plugins"
    status_sock = str(sim_root / "status.sock")
    vf = "0002:01:00.2"

    async def body() -> tuple[str, dict[str, Any]]:
        kubelet = FakeKubelet(str(plugin_dir))
        pods = FakePodResources(str(sim_root / "pod-resources.sock"))
        pods.pods.append(PodDevice("ml", "trainer-0", "nccl", RESOURCE, (vf,)))
        await kubelet.start()
        await pods.start()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-X", "importtime", "-m", "agent", "serve", "--config", str(config),
            "--sysfs-root", str(sim_node.root), "--dev-root", str(sim_node.root),
            "--device-plugin-dir", str(plugin_dir), "--devinfo-dir", str(sim_root / "devinfo"),
            "--pod-resources-socket", pods.socket, "--state-dir", str(sim_root / "state"),
            "--metrics-address", "", "--health-address", "", "--status-socket", status_sock,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == 4, timeout=30)
            await kubelet.allocate(RESOURCE, [vf])  # the Allocate path without its histogram
            doc = await fetch_status(status_sock)
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 20)
            assert proc.returncode == 0, err.decode()
            return err.decode(), doc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await pods.stop()
            await kubelet.stop()

    err, doc = asyncio.run(body())
    imported = _imported(err)
    assert "agent.adapters.deviceplugin" in imported  # the check sees imports
    assert not {m for m in imported if m.startswith(("prometheus_client", "agent.adapters.metrics"))}
    owners = {v["vf"]: v["owner"] for v in doc["vfs"]}
    assert owners[vf] == {"namespace": "ml", "pod": "trainer-0", "container": "nccl"}
    assert doc["pod_resources"] is True
