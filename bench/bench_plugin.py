"""Device-plugin timings over real unix sockets against the kubelet stand-in.

1. start -> registered: from ``App.run()`` being called (in-process) and from process spawn
   (``python -m agent serve``) to the kubelet stand-in accepting the registration;
2. Allocate latency: one-container Allocate RPCs (each writes a device-info file), p50/p99;
3. kubelet restart -> re-registered: the stand-in deletes every socket and serves a new
   kubelet.sock; measured from the new kubelet.sock being served to the agent's new registration.

Run: .venv/bin/python bench/bench_plugin.py [--allocs 1000] [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.app import build_agent
from agent.config import parse_config
from agent.demo import demo_settings
from agent.settings import Settings
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import dgx_spark

RESOURCE = "nvidia.com/cx7_qsfp"
CONFIG = f"resources:\n  - {{resourceName: {RESOURCE}, pfs: [{{pfName: enP2p1s0f0np0, numVfs: 4}}]}}\n"


def _settings(root: Path) -> Settings:
    """Every path under the simulated node, the agent's own state and status socket included."""
    return demo_settings(root)


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _fmt(name: str, ms: Sequence[float]) -> str:
    return (f"{name:<40} n={len(ms):<5} p50={pct(ms, 50):8.2f} ms  p99={pct(ms, 99):8.2f} ms  "
            f"max={max(ms):8.2f} ms")


def _registered_again(kubelet: FakeKubelet, seen: int) -> Callable[[], bool]:
    return lambda: len(kubelet.registrations) > seen


async def _in_process(root: Path, allocs: int, restarts: int) -> dict[str, list[float]]:
    settings = _settings(root)
    kubelet = FakeKubelet(settings.device_plugin_dir)
    await kubelet.start()
    agent = build_agent(settings, parse_config(CONFIG))
    t0 = time.monotonic()
    runner = asyncio.create_task(agent.run())
    out: dict[str, list[float]] = {"register": [], "allocate": [], "restart": []}
    try:
        await kubelet.wait_for(lambda: bool(kubelet.registrations), timeout=10)
        out["register"].append((kubelet.registrations[0][0] - t0) * 1000)
        await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == 4)
        ids = kubelet.healthy(RESOURCE)
        for i in range(allocs):
            start = time.perf_counter()
            await kubelet.allocate(RESOURCE, [ids[i % len(ids)]])
            out["allocate"].append((time.perf_counter() - start) * 1000)
        for _ in range(restarts):
            seen = len(kubelet.registrations)
            await kubelet.restart()
            assert kubelet.started_at is not None
            await kubelet.wait_for(_registered_again(kubelet, seen), timeout=10)
            out["restart"].append((kubelet.registrations[-1][0] - kubelet.started_at) * 1000)
    finally:
        await agent.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await kubelet.stop()
    return out


async def _process_start(root: Path) -> float:
    settings = _settings(root)
    (root / "config.yaml").write_text(CONFIG)
    kubelet = FakeKubelet(settings.device_plugin_dir)
    await kubelet.start()
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "serve", "--config", settings.config, "--sysfs-root", str(root),
        "--dev-root", str(root), "--device-plugin-dir", settings.device_plugin_dir,
        "--devinfo-dir", settings.devinfo_dir, "--metrics-address", "", "--health-address", "",
        "--status-socket", "", "--state-dir", settings.state_dir,
        "--pod-resources-socket", settings.pod_resources_socket,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await kubelet.wait_for(lambda: bool(kubelet.registrations), timeout=30)
        return (kubelet.registrations[0][0] - t0) * 1000
    finally:
        proc.terminate()
        await proc.wait()
        await kubelet.stop()


def _fresh_root() -> Path:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="srab-", dir=base))
    dgx_spark(root)
    return root


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--allocs", type=int, default=1000)
    p.add_argument("--runs", type=int, default=20, help="agent starts and kubelet restarts")
    p.add_argument("--process-runs", type=int, default=5)
    args = p.parse_args()

    results: dict[str, list[float]] = {"register": [], "allocate": [], "restart": [], "process": []}
    for i in range(args.runs):
        root = _fresh_root()
        try:
            got = asyncio.run(_in_process(root, args.allocs if i == 0 else 0, 1))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        for k, v in got.items():
            results[k].extend(v)
    for _ in range(args.process_runs):
        root = _fresh_root()
        try:
            results["process"].append(asyncio.run(_process_start(root)))
        finally:
            shutil.rmtree(root, ignore_errors=True)

    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, load {os.getloadavg()[0]:.2f}")
    print(_fmt("App.run() -> registered", results["register"]))
    print(_fmt("process spawn -> registered", results["process"]))
    print(_fmt("Allocate (1 VF, real socket)", results["allocate"]))
    print(_fmt("kubelet restart -> re-registered", results["restart"]))
    budget = 1000.0
    print(f"re-registration p99 / 1 s budget: {pct(results['restart'], 99) / budget:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
