"""Scrape time and agent memory with 2 PFs x 127 VFs (the CX-7 firmware maximum), simulated.

Runs the real `sriov-rdma-agent serve` (a subprocess) against a simulated node in tmpfs with the
kubelet stand-in, waits until the kubelet holds all 254 devices, then scrapes /metrics over HTTP
as VictoriaMetrics would and prints: scrape wall time (client side, median/p95/max), samples and
bytes per scrape, the agent's RSS after the scrapes and its peak (VmHWM), each against its target
(scrape < 50 ms, RSS < 60 MB). A second part times collect+render in-process (no HTTP) to show
where the time goes.

    .venv/bin/python bench/bench_metrics.py [--scrapes 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from procstat import cpu_seconds, free_port, status_kib

from agent.app import build_agent
from agent.config import parse_config
from agent.demo import demo_settings
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import SimNode, SimPf

REPO = Path(__file__).resolve().parent.parent
RESOURCE = "nvidia.com/cx7_qsfp"
CONFIG = f"""\
resources:
  - resourceName: {RESOURCE}
    pfs:
      - {{pfName: enP2p1s0f0np0, numVfs: 127}}
      - {{pfName: enP2p1s0f1np1, numVfs: 127}}
"""
SCRAPE_TARGET_MS = 50.0
RSS_TARGET_MB = 60.0


def build_node(root: Path) -> SimNode:
    return SimNode(root=root, pfs=[
        SimPf("0002:01:00.0", "enP2p1s0f0np0", totalvfs=127, numvfs=127),
        SimPf("0002:01:00.1", "enP2p1s0f1np1", totalvfs=127, numvfs=127, sriov_offset=128)]).build()


def mb(pid: int, name: str) -> float:
    return status_kib(pid, name) * 1024 / 1e6


def fetch(url: str) -> tuple[float, bytes]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as r:
        body: bytes = r.read()
    return (time.perf_counter() - start) * 1000, body


def summary(ms: list[float]) -> tuple[float, float, float]:
    ordered = sorted(ms)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))], ordered[-1]


async def over_http(root: Path, scrapes: int) -> None:
    (root / "config.yaml").write_text(CONFIG)
    plugins = root / "var/lib/kubelet/device-plugins"
    plugins.mkdir(parents=True)
    kubelet = FakeKubelet(str(plugins))
    await kubelet.start()
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "serve", f"--config={root}/config.yaml", f"--sysfs-root={root}",
        f"--dev-root={root}", f"--device-plugin-dir={plugins}", f"--devinfo-dir={root}/devinfo",
        f"--pod-resources-socket={root}/pod-resources.sock", f"--metrics-address=127.0.0.1:{port}",
        f"--health-address=127.0.0.1:{free_port()}", f"--status-socket={root}/status.sock",
        "--log-level=warning", cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await kubelet.wait_for(lambda: len(kubelet.devices(RESOURCE)) == 254, timeout=60)
        rss_ready = mb(proc.pid, "VmRSS")
        url = f"http://127.0.0.1:{port}/metrics"
        await asyncio.to_thread(fetch, url)  # warm-up (imports, first-touch of sysfs pages)
        times, body = [], b""
        cpu_before = cpu_seconds(proc.pid)
        for _ in range(scrapes):
            ms, body = await asyncio.to_thread(fetch, url)
            times.append(ms)
        cpu_ms = (cpu_seconds(proc.pid) - cpu_before) * 1000 / scrapes
        samples = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
        rss, hwm = mb(proc.pid, "VmRSS"), mb(proc.pid, "VmHWM")
        med, p95, worst = summary(times)
        print(f"HTTP scrape of `serve`, 2 PFs x 127 VFs, {scrapes} scrapes: {samples} samples, "
              f"{len(body) / 1024:.0f} KiB per scrape")
        print(f"  scrape wall time ms: median {med:.1f}  p95 {p95:.1f}  max {worst:.1f}  "
              f"(target < {SCRAPE_TARGET_MS:.0f}: median at {med / SCRAPE_TARGET_MS:.2f}x, "
              f"p95 at {p95 / SCRAPE_TARGET_MS:.2f}x of target)")
        print(f"  agent CPU per scrape ms: {cpu_ms:.1f} (target < {SCRAPE_TARGET_MS:.0f}: "
              f"{cpu_ms / SCRAPE_TARGET_MS:.2f}x of target; wall time above includes waiting for a core)")
        print(f"  agent RSS MB: ready {rss_ready:.1f}  after scrapes {rss:.1f}  peak (VmHWM) {hwm:.1f}  "
              f"(target < {RSS_TARGET_MB:.0f}: peak at {hwm / RSS_TARGET_MB:.2f}x of target)")
    finally:
        proc.terminate()
        await proc.wait()
        await kubelet.stop()


async def in_process(root: Path, rounds: int) -> None:
    (root / "config.yaml").write_text(CONFIG)
    agent = build_agent(demo_settings(root), parse_config(CONFIG))
    await agent.inventory.rescan("bench")
    assert agent.metrics is not None
    await agent.metrics.render()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await agent.metrics.render()
        times.append((time.perf_counter() - start) * 1000)
    med, p95, worst = summary(times)
    print(f"in-process collect + render (no HTTP), {rounds} rounds: median {med:.1f}  p95 {p95:.1f}  "
          f"max {worst:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=50)
    scrapes = parser.parse_args().scrapes
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.2f}")
    tmpfs = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    for part in (over_http, in_process):
        root = Path(tempfile.mkdtemp(prefix="bench-metrics-", dir=tmpfs))
        try:
            build_node(root)
            asyncio.run(part(root, scrapes))
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
