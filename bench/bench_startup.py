"""Start-up, memory and Allocate of `serve`, next to the floor of a grpcio device plugin.

Each kind runs as a real process against the kubelet stand-in (agent/sim/kubelet.py) on a simulated
DGX Spark (tmpfs), in interleaved rounds so machine load hits every kind alike:

* ours: ``python -m agent serve`` of this checkout (and of each ``--tree``, e.g. a git worktree of
  an earlier commit, to price one change);
* floor: bench/floor_plugin.py, the least a Python plugin on grpcio can do (serve, Register, list one
  device, answer Allocate with a response the size of ours);
* floor+deps: the same, also importing PyYAML, prometheus_client and grpc_health, which `serve`
  needs for its config, metrics and health endpoint.

Per run: exec -> Register at the stand-in; CPU the process used until then; VmHWM after an
Allocate burst (one container, one VF per call, real unix socket) and that burst's p50/p99/max;
idle CPU over ``--idle`` seconds (first round only).

    .venv/bin/python bench/bench_startup.py [--rounds 7] [--allocs 500] [--idle 20] [--obs] [--tree DIR]
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from procstat import compile_agent, cpu_seconds, free_port, status_kib

from agent.sim.kubelet import FakeKubelet
from agent.sim.node import dgx_spark

REPO = Path(__file__).resolve().parent.parent
RESOURCE = "nvidia.com/cx7_qsfp"
CONFIG = f"resources:\n  - {{resourceName: {RESOURCE}, pfs: [{{pfName: enP2p1s0f0np0, numVfs: 4}}]}}\n"
DEPS = "yaml,prometheus_client,grpc_health.v1.health"


@dataclass
class Run:
    register_ms: float
    cpu_ms: float  # CPU time (all threads) until the Register
    hwm_mib: float
    alloc_ms: list[float]
    idle_pct: float | None


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def cpu_ms_all_threads(pid: int) -> float:
    """Nanosecond CPU time from schedstat: /proc/<pid>/stat counts 10 ms ticks."""
    task = f"/proc/{pid}/task"
    return sum(int(Path(f"{task}/{t}/schedstat").read_text().split()[0]) for t in os.listdir(task)) / 1e6


def argv_for(kind: str, root: Path, plugin_dir: Path, obs: bool) -> tuple[list[str], dict[str, str]]:
    if kind.startswith("floor"):
        env = {"FLOOR_IMPORTS": DEPS} if kind == "floor+deps" else {}
        return [sys.executable, str(REPO / "bench/floor_plugin.py"), str(plugin_dir)], env
    ports = ([f"--metrics-address=127.0.0.1:{free_port()}", f"--health-address=127.0.0.1:{free_port()}"]
             if obs else ["--metrics-address=", "--health-address="])
    return [sys.executable, "-m", "agent", "serve", f"--config={root}/config.yaml", f"--sysfs-root={root}",
            f"--dev-root={root}", f"--device-plugin-dir={plugin_dir}", f"--devinfo-dir={root}/devinfo",
            f"--pod-resources-socket={root}/pod-resources.sock", f"--state-dir={root}/state",
            f"--status-socket={root}/status.sock", *ports], {}


async def one(kind: str, tree: Path, allocs: int, idle: float, obs: bool) -> Run:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="srab-", dir=base))
    try:
        sim = dgx_spark(root)
        (root / "config.yaml").write_text(CONFIG)
        plugin_dir = root / "dp"
        kubelet = FakeKubelet(str(plugin_dir))
        await kubelet.start()
        argv, env = argv_for(kind, root, plugin_dir, obs)
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=tree, env={**os.environ, **env},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            await kubelet.wait_for(lambda: bool(kubelet.registrations), timeout=60)
            register_ms = (kubelet.registrations[0][0] - t0) * 1000
            cpu_ms = cpu_ms_all_threads(proc.pid)
            await kubelet.wait_for(lambda: bool(kubelet.healthy(RESOURCE)), timeout=60)
            ids = kubelet.healthy(RESOURCE)
            if not kind.startswith("floor"):
                pf = sim.pf("enP2p1s0f0np0")
                assert len(ids) == pf.numvfs
            lat = []
            for i in range(allocs):
                t = time.perf_counter()
                await kubelet.allocate(RESOURCE, [ids[i % len(ids)]])
                lat.append((time.perf_counter() - t) * 1000)
            idle_pct = None
            if idle > 0:
                await asyncio.sleep(2)  # start-up work settles first
                c0, w0 = cpu_seconds(proc.pid), time.monotonic()
                await asyncio.sleep(idle)
                idle_pct = 100 * (cpu_seconds(proc.pid) - c0) / (time.monotonic() - w0)
            return Run(register_ms, cpu_ms, status_kib(proc.pid, "VmHWM") / 1024, lat, idle_pct)
        finally:
            proc.terminate()
            await proc.wait()
            await kubelet.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--allocs", type=int, default=500)
    p.add_argument("--idle", type=float, default=20.0, help="idle window in seconds (first round)")
    p.add_argument("--obs", action="store_true", help="ours with metrics and health endpoints on")
    p.add_argument("--tree", action="append", default=[], help="another checkout to run as ours")
    p.add_argument("--no-floor", action="store_true")
    args = p.parse_args()

    kinds: list[tuple[str, str, Path]] = [("ours", "ours", REPO)]
    kinds += [(f"ours@{Path(t).name}", "ours", Path(t).resolve()) for t in args.tree]
    if not args.no_floor:
        kinds += [("floor", "floor", REPO), ("floor+deps", "floor+deps", REPO)]
    for _, _, tree in kinds:
        compile_agent(tree)
    runs: dict[str, list[Run]] = {label: [] for label, _, _ in kinds}
    for r in range(args.rounds):
        idle = args.idle if r == 0 else 0.0
        for label, kind, tree in kinds:
            runs[label].append(asyncio.run(one(kind, tree, args.allocs, idle, args.obs)))

    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, load {os.getloadavg()[0]:.2f}; "
          f"{args.rounds} rounds, {args.allocs} Allocates each; ours with metrics/health "
          f"{'on' if args.obs else 'off'}")
    print(f"{'':16} {'exec->Register ms':>22} {'CPU to Register':>16} {'VmHWM':>7} "
          f"{'Allocate ms (medians of runs)':>30} {'idle CPU':>9}")
    print(f"{'':16} {'median':>10} {'min':>11} {'ms, median':>16} {'MiB':>7} {'p50':>10} {'p99':>9} "
          f"{'max':>9} {'% core':>9}")
    for label, _, _ in kinds:
        rs = runs[label]
        idle = next((x.idle_pct for x in rs if x.idle_pct is not None), None)
        print(f"{label:16} {statistics.median(x.register_ms for x in rs):10.0f} "
              f"{min(x.register_ms for x in rs):11.0f} {statistics.median(x.cpu_ms for x in rs):16.0f} "
              f"{statistics.median(x.hwm_mib for x in rs):7.1f} "
              f"{statistics.median(pct(x.alloc_ms, 50) for x in rs):10.2f} "
              f"{statistics.median(pct(x.alloc_ms, 99) for x in rs):9.2f} "
              f"{statistics.median(max(x.alloc_ms) for x in rs):9.2f} "
              f"{'-' if idle is None else f'{idle:.3f}':>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
