"""Registration latency of the agent in every kubelet ordering, against the kubelet stand-in.

The stand-in creates kubelet.sock as the Go kubelet does (wipe every socket, bind(), then listen()),
so the agent sees IN_CREATE before the kubelet accepts connections. Each ordering is measured from
kubelet.sock accepting connections (listen) to the stand-in answering the agent's Register, and
every run also counts the Registers each kubelet instance got (the target is exactly one).

Orderings: the agent started while the kubelet is down (with one resource, and with two registering
at once); a kubelet restart; the kubelet stopped and
started later; a restart whose bind() -> listen() window is ``--listen-delay`` long. "kubelet up
first" is measured from App.run() instead (there is no kubelet.sock event to measure from).

Run: .venv/bin/python bench/bench_register.py [--runs 30] [--listen-delay 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from bench_plugin import _settings, pct

from agent.app import App, build_agent
from agent.config import parse_config
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import dgx_spark

RESOURCE = "nvidia.com/cx7_qsfp"
SECOND = "example.com/cx7_port1"
CONFIG = f"resources:\n  - {{resourceName: {RESOURCE}, pfs: [{{pfName: enP2p1s0f0np0, numVfs: 4}}]}}\n"
# Two resources register at once, as two PluginLifecycles dialling the same kubelet.sock.
CONFIG2 = CONFIG + f"  - {{resourceName: {SECOND}, pfs: [{{pfName: enp1s0f0np0, numVfs: 2}}]}}\n"
# Where in the agent's retry cycle the kubelet arrives: spread over the first few backoff steps.
AGENT_FIRST_DELAYS = (0.05, 0.25, 0.5, 0.9, 1.4, 2.0)


@contextlib.asynccontextmanager
async def _agent(root: Path, config: str = CONFIG) -> AsyncIterator[App]:
    agent = build_agent(_settings(root), parse_config(config))
    runner = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        await agent.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


class Run:
    """Latencies (ms) and Registers per kubelet instance for one ordering."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ms: list[float] = []
        self.exactly_once = 0

    async def observe(self, kubelet: FakeKubelet, start: float,
                      resources: Sequence[str] = (RESOURCE,)) -> None:
        """Wait for the current kubelet instance's Register of every resource (the latency is the
        last one's); then give a second Register time to show."""
        instance = kubelet.instance

        def registered() -> bool:
            return all(kubelet.registers_per_instance(r)[instance] >= 1 for r in resources)
        await kubelet.wait_for(registered, timeout=30)
        last = max(next(c.at for c in kubelet.calls if c.instance == instance and c.resource == r
                        and not c.problem) for r in resources)
        self.ms.append((last - start) * 1000)
        await asyncio.sleep(0.05)  # a double Register arrives 2-5 ms after the first
        if all(kubelet.registers_per_instance(r)[instance] == 1 for r in resources):
            self.exactly_once += 1

    def line(self) -> str:
        return (f"{self.name:<34} n={len(self.ms):<4} p50={pct(self.ms, 50):8.2f} ms  "
                f"p99={pct(self.ms, 99):8.2f} ms  max={max(self.ms):8.2f} ms  "
                f"one Register: {self.exactly_once}/{len(self.ms)}")


async def _kubelet_first(root: Path, run: Run) -> None:
    kubelet = FakeKubelet(_settings(root).device_plugin_dir)
    await kubelet.start()
    try:
        t0 = time.monotonic()
        async with _agent(root):
            await run.observe(kubelet, t0)
    finally:
        await kubelet.stop()


async def _agent_first(root: Path, run: Run, delay: float, config: str = CONFIG) -> None:
    kubelet = FakeKubelet(_settings(root).device_plugin_dir)
    try:
        async with _agent(root, config):
            await asyncio.sleep(delay)
            await kubelet.start()
            assert kubelet.started_at is not None
            resources = (RESOURCE, SECOND) if config == CONFIG2 else (RESOURCE,)
            await run.observe(kubelet, kubelet.started_at, resources)
    finally:
        await kubelet.stop()


async def _restarts(root: Path, runs: int, listen_delay: float) -> list[Run]:
    restart, later, window = Run("kubelet restart"), Run("kubelet stopped, started 1 s later"), \
        Run(f"restart, listen {listen_delay * 1000:.0f} ms after bind")
    kubelet = FakeKubelet(_settings(root).device_plugin_dir)
    await kubelet.start()
    try:
        async with _agent(root):
            await kubelet.wait_for(lambda: bool(kubelet.registrations), timeout=30)
            for _ in range(runs):
                await kubelet.restart()
                assert kubelet.started_at is not None
                await restart.observe(kubelet, kubelet.started_at)
            for _ in range(runs):
                await kubelet.stop()
                await asyncio.sleep(1.0)
                await kubelet.start()
                assert kubelet.started_at is not None
                await later.observe(kubelet, kubelet.started_at)
            kubelet.listen_delay = listen_delay
            for _ in range(runs):
                await kubelet.restart()
                assert kubelet.started_at is not None
                await window.observe(kubelet, kubelet.started_at)
    finally:
        await kubelet.stop()
    return [restart, later, window]


def _fresh_root() -> Path:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="srar-", dir=base))
    dgx_spark(root)
    return root


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30, help="runs per ordering")
    p.add_argument("--listen-delay", type=float, default=0.2, help="bind() -> listen() window, seconds")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the agent's retry warnings are expected here

    first, agent_first = Run("kubelet up first (from App.run())"), Run("agent up first")
    two = Run("agent up first, 2 resources")
    for i in range(args.runs):
        delay = AGENT_FIRST_DELAYS[i % len(AGENT_FIRST_DELAYS)]
        for one in (functools.partial(_kubelet_first, run=first),
                    functools.partial(_agent_first, run=agent_first, delay=delay),
                    functools.partial(_agent_first, run=two, delay=delay, config=CONFIG2)):
            root = _fresh_root()
            try:
                asyncio.run(one(root))
            finally:
                shutil.rmtree(root, ignore_errors=True)
    root = _fresh_root()
    try:
        others = asyncio.run(_restarts(root, args.runs, args.listen_delay))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, load {os.getloadavg()[0]:.2f}")
    print("from kubelet.sock accepting connections to the kubelet answering Register:")
    for run in (first, agent_first, two, *others):
        print(run.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
