#!/usr/bin/env python3
"""What a VF lifecycle reconcile costs the agent, and what a hung sysfs write costs the event loop.

    .venv/bin/python bench/lifecycle_reconcile.py [--runs N]

1. Steady state: a reconcile over a node already in the desired state (observe sysfs + netlink, plan,
   nothing to write) for 1 PF x 4 VFs and 2 PFs x 127 VFs: median and p95 over N runs. This is what
   every config reload and PF event costs when nothing changed.
2. Creation 0 -> N on the simulated node (SimKernel, no artificial delays): wall time of the whole
   reconcile, which includes building the simulated sysfs tree for the new VFs (the kernel's share).
3. Event-loop lag while a sysfs write hangs: a 1 ms ticker measures how late it wakes up, idle and
   during a write that hangs past its timeout. Lag is the agent's ability to answer ListAndWatch,
   Allocate and health probes meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from agent.adapters.executor import Timeouts
from agent.app import build_agent
from agent.config import parse_config
from agent.services.lifecycle import Lifecycle
from agent.settings import Settings
from agent.sim.kernel import SimKernel, SimNetlink
from agent.sim.node import SimNode, SimPf


def settings(root: Path) -> Settings:
    return Settings(config=str(root / "config.yaml"), sysfs_root=str(root), dev_root=str(root),
                    device_plugin_dir=str(root / "dp"), devinfo_dir=str(root / "devinfo"),
                    pod_resources_socket=str(root / "none.sock"), metrics_address="", health_address="")


def rig(root: Path, pfs: int, vfs: int, numvfs: int) -> tuple[Lifecycle, SimKernel]:
    sims = [SimPf(f"000{i}:01:00.0", f"enP{i}p1s0f0np0", totalvfs=vfs, numvfs=numvfs) for i in range(pfs)]
    node = SimNode(root, sims).build()
    text = "resources:\n  - resourceName: nvidia.com/cx7_qsfp\n    pfs:\n" + "".join(
        f"      - {{pfName: {p.netdev}, numVfs: {vfs}, trust: true}}\n" for p in sims)
    (root / "config.yaml").write_text(text)
    nl = SimNetlink(node)
    kernel = SimKernel(node, netlink=nl)
    agent = build_agent(settings(root), parse_config(text), writer=kernel, netlink=nl,
                        timeouts=Timeouts(vf_wait=300))
    return agent.lifecycle, kernel


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def steady(root: Path, pfs: int, vfs: int, runs: int) -> tuple[float, float, float, int]:
    lc, kernel = rig(root, pfs, vfs, 0)
    t0 = time.perf_counter()
    await lc.reconcile("create")
    create = time.perf_counter() - t0
    writes = len(kernel.writes)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await lc.reconcile("steady")
        times.append(time.perf_counter() - t0)
    assert len(kernel.writes) == writes, "a steady-state reconcile wrote something"
    return create, statistics.median(times), pct(times, 0.95), writes


async def loop_lag(root: Path, seconds: float, hang: bool) -> list[float]:
    lc, kernel = rig(root, 1, 8, 0)
    lc.executor.timeouts = Timeouts(sysfs_write=seconds / 2)
    hung = kernel.hang_next("sriov_numvfs") if hang else None
    lags: list[float] = []
    stop = time.perf_counter() + seconds

    async def ticker() -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t0 - 0.001)

    tick = asyncio.create_task(ticker())
    if hang:
        await lc.reconcile("hung")  # returns after the write timeout; the write stays blocked
    await tick
    if hung is not None:
        hung.release.set()
        while lc.executor.hung("0000:01:00.0"):  # let the released write finish before cleaning up
            await asyncio.sleep(0.01)
    return lags


async def main(runs: int) -> None:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="sra-bench-", dir=base) as tmp:
        root = Path(tmp)
        print("steady-state reconcile (node already as configured; nothing written)")
        print(f"{'case':<18}{'create 0->N (s)':>17}{'median (ms)':>13}{'p95 (ms)':>10}{'writes':>8}")
        for name, pfs, vfs in (("1 PF x 4 VFs", 1, 4), ("2 PFs x 127 VFs", 2, 127)):
            create, med, p95, writes = await steady(root / name.replace(" ", ""), pfs, vfs, runs)
            print(f"{name:<18}{create:>17.2f}{med * 1000:>13.1f}{p95 * 1000:>10.1f}{writes:>8}")
        print("\nevent-loop lag of a 1 ms ticker (ms)")
        print(f"{'case':<34}{'p50':>8}{'p99':>8}{'max':>8}{'ticks':>8}")
        idle = await loop_lag(root / "idle", 2.0, hang=False)
        hung = await loop_lag(root / "hung", 2.0, hang=True)
        for name, lags in (("idle", idle), ("sysfs write hung (timeout 1 s)", hung)):
            print(f"{name:<34}{pct(lags, 0.5) * 1000:>8.2f}{pct(lags, 0.99) * 1000:>8.2f}"
                  f"{max(lags) * 1000:>8.2f}{len(lags):>8}")
        print(f"\np99 lag ratio hung/idle: {pct(hung, 0.99) / max(pct(idle, 0.99), 1e-9):.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    asyncio.run(main(p.parse_args().runs))
