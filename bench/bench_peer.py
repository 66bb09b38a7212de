"""Our agent and the community SR-IOV device plugin side by side, in one run, on one simulated node.

Both run as real processes (agent/sim/peer.py): the community plugin (sriovdp, ../shared/peers) in
a private mount namespace over the simulated DGX Spark, ours from its `serve` command line, both in
one network namespace whose veths carry the node's netdev names, both against the same kubelet
stand-in (agent/sim/kubelet.py: Go's bind-then-listen kubelet.sock, sockets wiped at start). One
plugin runs at a time (they serve the same socket name); each section runs the peer, then ours.

Measured for each plugin:
* start (exec) -> registered: process spawn to the stand-in accepting Register, kubelet up before;
* Allocate of 1 VF, one container request per call: p50, p99, max;
* registration in each ordering, from the moment the new kubelet.sock accepts connections (listen)
  to the Register that reaches it, and how many Registers each kubelet.sock received:
  kubelet restart (every socket wiped), kubelet stopped then started later, bind-then-listen
  (kubelet.sock exists LISTEN_DELAY before it listens), kubelet.sock replaced by the kubelet's
  serve-retry (same kubelet, plugin sockets kept), plugin up 0.2-2 s before the kubelet, and the
  kubelet starting the moment the plugin serves (a node boot). Before each kubelet event the bench
  waits a random 0-5 s when the peer runs, so the peer's 5 s socket poll is met at every phase;
* PF carrier loss (the veth's far end down) -> every VF Unhealthy at the kubelet, and back;
* VmRSS and VmHWM after start and the Allocate burst;
* idle CPU over IDLE seconds once registered;
* SIGTERM -> exit.

Run (root): .venv/bin/python bench/bench_peer.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from procstat import compile_agent, cpu_seconds, status_kib

from agent.sim.kubelet import FakeKubelet, SeenDevice
from agent.sim.peer import PeerNode, PluginProcess, peer_binary, peer_node, peer_process

REPO = Path(__file__).resolve().parent.parent
RESOURCE = "nvidia.com/cx7_qsfp"
PF = "enP2p1s0f0np0"
LISTEN_DELAY = 0.1  # bind() -> listen() window of the bind-then-listen ordering
PLUGINS = ("peer", "ours")
SETTLE_S = 0.3  # after a Register, how long a second one for the same kubelet.sock is looked for
PEER_POLL_S = 5.0  # the peer stats its socket this often (rsWatchInterval, pkg/resources/server.go)


@dataclass(frozen=True)
class Params:
    allocs: int
    runs: int  # per registration ordering
    sigterm_runs: int
    link_runs: int
    idle_s: float
    gap_s: float  # kubelet stopped for this long before it starts again
    health_wait_s: float  # how long to wait for Unhealthy before calling it "never"
    no_register_runs: int  # orderings where a plugin does not register: runs at health_wait_s cost


FULL = Params(allocs=500, runs=50, sigterm_runs=10, link_runs=20, idle_s=20, gap_s=2.0, health_wait_s=25,
              no_register_runs=5)
QUICK = Params(allocs=50, runs=3, sigterm_runs=2, link_runs=2, idle_s=3, gap_s=0.3, health_wait_s=6,
               no_register_runs=1)


@dataclass
class Cell:
    """One plugin's result for one row: samples in ms and/or a plain value and a note."""

    ms: list[float] = field(default_factory=list)
    registers: list[int] = field(default_factory=list)  # Registers per kubelet.sock, per run
    value: float | None = None
    unit: str = ""
    note: str = ""


Table = dict[str, dict[str, Cell]]


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def cell(table: Table, row: str, plugin: str) -> Cell:
    return table.setdefault(row, {}).setdefault(plugin, Cell())


def make(node: PeerNode, plugin: str) -> PluginProcess:
    return node.peer() if plugin == "peer" else node.ours()


async def first_registration(kubelet: FakeKubelet, seen: int, proc: PluginProcess,
                             timeout: float) -> float | None:
    """time.monotonic() of registration number ``seen`` + 1; None if the plugin exited or timed out."""
    assert proc.proc is not None
    waiter = asyncio.ensure_future(kubelet.wait_for(lambda: len(kubelet.registrations) > seen, timeout))
    exited = asyncio.ensure_future(proc.proc.wait())
    await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
    exited.cancel()
    if not waiter.done():
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        return None
    try:
        await waiter
    except TimeoutError:
        return None
    return kubelet.registrations[seen][0]


def registers_on_current_sock(kubelet: FakeKubelet) -> int:
    """Accepted Registers that came in on the kubelet.sock the stand-in listens on now."""
    return sum(1 for c in kubelet.calls if c.resource == RESOURCE and not c.problem
               and (c.instance, c.socket_inode) == (kubelet.instance, kubelet.socket_inode))


class Live:
    """One long-running plugin, respawned (and counted) if it exits, as its DaemonSet would."""

    def __init__(self, node: PeerNode, plugin: str, kubelet: FakeKubelet, params: Params) -> None:
        self.node, self.plugin, self.kubelet, self.params = node, plugin, kubelet, params
        self.proc = make(node, plugin)
        self.exits: list[int] = []
        self.rng = random.Random(11)

    async def up(self) -> None:
        if self.proc.returncode is not None:
            self.exits.append(self.proc.returncode)
            self.proc = make(self.node, self.plugin)
        if self.proc.proc is None:
            seen = len(self.kubelet.registrations)
            if not self.kubelet.socket_inode:
                await self.kubelet.start()
            await self.proc.start()
            if await first_registration(self.kubelet, seen, self.proc, 30) is None:
                raise RuntimeError(f"{self.plugin} did not register:\n{self.proc.log()[-2000:]}")
            await self.kubelet.wait_for(lambda: len(self.kubelet.healthy(RESOURCE)) == 4, timeout=30)


async def ordering(table: Table, row: str, live: Live, runs: int,
                   kubelet_event: Callable[[], Awaitable[None]]) -> None:
    """``runs`` times: the kubelet does ``kubelet_event``; the plugin's next Register, timed from
    the new kubelet.sock listening, and the Registers that kubelet.sock got."""
    c = cell(table, row, live.plugin)
    missed = 0
    for _ in range(runs):
        await live.up()
        if live.plugin == "peer":  # sample the phase of its 5 s poll, not one fixed point of it
            await asyncio.sleep(live.rng.uniform(0, PEER_POLL_S))
        seen = len(live.kubelet.registrations)
        await kubelet_event()
        listening = live.kubelet.started_at
        assert listening is not None
        at = await first_registration(live.kubelet, seen, live.proc, live.params.health_wait_s)
        if at is None:
            missed += 1
        else:
            c.ms.append((at - listening) * 1000)
            await asyncio.sleep(SETTLE_S)  # a second Register for this kubelet.sock would land here
        c.registers.append(registers_on_current_sock(live.kubelet))
    notes = []
    if missed:
        notes.append(f"no Register within {live.params.health_wait_s:.0f} s in {missed}/{runs} runs")
    if live.exits:
        notes.append(f"exited {len(live.exits)}x (status {sorted(set(live.exits))}), respawned")
        live.exits.clear()
    c.note = "; ".join(notes)


async def start_runs(table: Table, node: PeerNode, plugin: str, runs: int) -> None:
    """Kubelet up before the plugin: exec -> registered, fresh kubelet.sock and process each run."""
    kubelet = FakeKubelet(node.settings.device_plugin_dir)
    c = cell(table, "kubelet up before: exec -> Register", plugin)
    for _ in range(runs):
        await kubelet.start()
        proc = make(node, plugin)
        await proc.start()
        try:
            at = await first_registration(kubelet, len(kubelet.registrations), proc, 30)
            if at is None:
                raise RuntimeError(f"{plugin} did not register:\n{proc.log()[-2000:]}")
            c.ms.append((at - proc.started_at) * 1000)
            await asyncio.sleep(SETTLE_S)
            c.registers.append(registers_on_current_sock(kubelet))
        finally:
            await proc.kill()
            await kubelet.stop()


async def plugin_first_runs(table: Table, node: PeerNode, plugin: str, runs: int, *, row: str,
                            delay: Callable[[], float]) -> None:
    """The plugin up before the kubelet: kubelet.sock appears ``delay()`` s after the plugin's socket."""
    kubelet = FakeKubelet(node.settings.device_plugin_dir)
    c = cell(table, row, plugin)
    sock = Path(node.settings.device_plugin_dir) / "nvidia.com_cx7_qsfp.sock"
    exits: list[tuple[int, float]] = []
    for _ in range(runs):
        sock.unlink(missing_ok=True)
        proc = make(node, plugin)
        await proc.start()
        try:
            async with asyncio.timeout(30):
                while not sock.exists() and proc.returncode is None:
                    await asyncio.sleep(0.001)
            code = proc.returncode if proc.returncode is not None else await proc.wait(delay())
            if code is not None:
                exits.append((code, (time.monotonic() - proc.started_at) * 1000))
                continue
            seen = len(kubelet.registrations)
            await kubelet.start()
            assert kubelet.started_at is not None
            at = await first_registration(kubelet, seen, proc, 30)
            if at is None:
                code = proc.returncode
                exits.append((-1 if code is None else code, (time.monotonic() - proc.started_at) * 1000))
                continue
            c.ms.append((at - kubelet.started_at) * 1000)
            await asyncio.sleep(SETTLE_S)
            c.registers.append(registers_on_current_sock(kubelet))
        finally:
            await proc.kill()
            await kubelet.stop()
    if exits:
        codes = sorted({code for code, _ in exits})
        c.note = (f"no Register, exited in {len(exits)}/{runs} runs (status {codes}; -1: none in 30 s), "
                  f"p50 {pct([t for _, t in exits], 50):.0f} ms after exec")


async def link_runs(table: Table, live: Live, runs: int) -> None:
    """The QSFP PF's far end down until the kubelet has every VF Unhealthy, then up until Healthy."""
    down, up = cell(table, "PF carrier lost -> VFs Unhealthy", live.plugin), \
        cell(table, "PF carrier back -> VFs Healthy", live.plugin)
    vfs = live.node.vfs()
    kubelet = live.kubelet

    wait_s = live.params.health_wait_s

    def all_are(devices: dict[str, SeenDevice], health: str) -> bool:
        return all(devices.get(v) is not None and devices[v].health == health for v in vfs)

    for _ in range(runs):
        await live.up()
        ep = kubelet.endpoints[RESOURCE]
        for carrier, c, health in ((False, down, "Unhealthy"), (True, up, "Healthy")):
            t0 = time.monotonic()
            live.node.netns.set_carrier(PF, carrier)
            try:
                done = functools.partial(lambda h: all_are(kubelet.devices(RESOURCE), h), health)
                await kubelet.wait_for(done, timeout=wait_s)
            except TimeoutError:
                c.note = f"never (waited {wait_s:.0f} s; {len(ep.updates)} ListAndWatch sends in all)"
                live.node.netns.set_carrier(PF, True)
                return
            at = next(t for t, devs in ep.updates if t >= t0 and all_are(devs, health))
            c.ms.append((at - t0) * 1000)


async def long_running(table: Table, node: PeerNode, plugin: str, params: Params) -> None:
    """One process: Allocate burst, memory, idle CPU, the kubelet orderings, link health, SIGTERM."""
    kubelet = FakeKubelet(node.settings.device_plugin_dir)
    live = Live(node, plugin, kubelet, params)
    try:
        await live.up()
        c = cell(table, "Allocate 1 VF", plugin)
        vfs = node.vfs()
        for i in range(params.allocs):
            t = time.perf_counter()
            await kubelet.allocate(RESOURCE, [vfs[i % len(vfs)]])
            c.ms.append((time.perf_counter() - t) * 1000)
        pid = live.proc.pid
        cell(table, "VmRSS after start + Allocates", plugin).value = status_kib(pid, "VmRSS") / 1024
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(params.idle_s)
        idle = cell(table, f"idle CPU over {params.idle_s:.0f} s", plugin)
        idle.value = 100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        idle.unit = "% of a core"

        await ordering(table, "kubelet restart", live, params.runs, kubelet.restart)

        async def stop_then_start() -> None:
            await kubelet.stop()
            await asyncio.sleep(params.gap_s)
            await kubelet.start()
        await ordering(table, f"kubelet stopped, started {params.gap_s:g} s later", live, params.runs,
                       stop_then_start)

        async def bind_then_listen() -> None:
            await kubelet.stop()
            kubelet.bind()
            await asyncio.sleep(LISTEN_DELAY)
            await kubelet.listen()
        await ordering(table, f"bind-then-listen ({LISTEN_DELAY * 1000:.0f} ms window)", live, params.runs,
                       bind_then_listen)

        # The peer keeps its socket, so it never notices; runs cost health_wait_s each.
        relisten_runs = params.no_register_runs if plugin == "peer" else params.runs
        await ordering(table, "kubelet.sock replaced (serveWithRetry)", live, relisten_runs, kubelet.relisten)

        await link_runs(table, live, params.link_runs)
        await live.up()
        pid = live.proc.pid
        cell(table, "VmHWM (peak RSS)", plugin).value = status_kib(pid, "VmHWM") / 1024
        t = time.monotonic()
        code = await live.proc.terminate(timeout=30)
        sig = cell(table, "SIGTERM -> exit", plugin)
        sig.ms.append((time.monotonic() - t) * 1000)
        sig.note = f"status {code}"
    finally:
        await live.proc.kill()
        await kubelet.stop()


async def sigterm_runs(table: Table, node: PeerNode, plugin: str, params: Params) -> None:
    kubelet = FakeKubelet(node.settings.device_plugin_dir)
    c = cell(table, "SIGTERM -> exit", plugin)
    codes = {int(c.note.removeprefix("status "))} if c.note else set()
    for _ in range(params.sigterm_runs):
        live = Live(node, plugin, kubelet, params)
        try:
            await live.up()
            t = time.monotonic()
            codes.add(await live.proc.terminate(timeout=30))
            c.ms.append((time.monotonic() - t) * 1000)
        finally:
            await live.proc.kill()
            await kubelet.stop()
    c.note = "status " + ",".join(map(str, sorted(codes)))


def launcher_cost(node: PeerNode, runs: int = 10) -> tuple[float, float]:
    """Median ms to exec and exit /bin/true through each plugin's launcher (netns; mount namespace)."""
    true = Path("/bin/true")
    peer = peer_process(true, node.sim, node.settings, netns=node.netns, log_path=node.root / "true.log").argv
    ours = ["ip", "netns", "exec", node.netns.name, str(true)]
    out = []
    for argv in (peer, ours):
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            times.append((time.perf_counter() - t) * 1000)
        out.append(pct(times, 50))
    return out[0], out[1]


def fmt(c: Cell | None) -> str:
    if c is None:
        return "-"
    parts = []
    if c.ms:
        parts.append(f"p50 {pct(c.ms, 50):.1f} / p99 {pct(c.ms, 99):.1f} / max {max(c.ms):.1f} ms "
                     f"(n={len(c.ms)})")
    if c.registers:
        lo, hi = min(c.registers), max(c.registers)
        parts.append(f"Register/sock {lo}" if lo == hi else f"Register/sock {lo}-{hi}")
    if c.value is not None:
        parts.append(f"{c.value:.2f} {c.unit or 'MiB'}")
    if c.note:
        parts.append(c.note)
    return "; ".join(parts) or "-"


def ratio(peer: Cell | None, ours: Cell | None) -> str:
    if peer is None or ours is None:
        return "-"
    if peer.ms and ours.ms:
        p50, p99 = pct(peer.ms, 50), pct(peer.ms, 99)
        return (f"{pct(ours.ms, 50) / p50:.3g} / {pct(ours.ms, 99) / p99:.3g}" if p50 > 0 and p99 > 0
                else "-")
    if peer.value and ours.value is not None:
        return f"{ours.value / peer.value:.3g}"
    return "-"


def render(table: Table) -> str:
    lines = ["| metric | community plugin (sriovdp) | ours | ours/peer |", "|---|---|---|---|"]
    for row, cells in table.items():
        lines.append(f"| {row} | {fmt(cells.get('peer'))} | {fmt(cells.get('ours'))} | "
                     f"{ratio(cells.get('peer'), cells.get('ours'))} |")
    return "\n".join(lines)


async def bench(node: PeerNode, params: Params) -> Table:
    table: Table = {}
    for plugin in PLUGINS:
        await start_runs(table, node, plugin, params.runs)
    for plugin in PLUGINS:
        node.clear_devinfo()
        await long_running(table, node, plugin, params)
    for plugin in PLUGINS:
        await sigterm_runs(table, node, plugin, params)
    rng = random.Random(7)
    for plugin in PLUGINS:
        await plugin_first_runs(table, node, plugin, params.runs, row="plugin up 0.2-2 s before kubelet",
                                delay=lambda: rng.uniform(0.2, 2.0))
    for plugin in PLUGINS:  # the peer's Register waits out the kubelet's 10 s dial here: fewer runs
        runs = 2 * params.no_register_runs if plugin == "peer" else params.runs
        await plugin_first_runs(table, node, plugin, runs, row="kubelet starts as the plugin serves",
                                delay=lambda: 0.0)
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few runs of each, for a smoke test")
    args = p.parse_args()
    params = QUICK if args.quick else FULL
    binary = peer_binary(REPO)
    if not binary.is_file():
        print(f"community device plugin binary not found at {binary} (set SRIOV_PEER_BINARY)",
              file=sys.stderr)
        return 2
    compile_agent(REPO)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: processes, netns, tree removed
    with peer_node(binary) as node:
        table = asyncio.run(bench(node, params))
        peer_launch, our_launch = launcher_cost(node)
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"load {os.getloadavg()[0]:.2f}; {'quick' if args.quick else 'full'} run, "
          f"{time.monotonic() - started:.0f} s")
    print(f"launcher (exec /bin/true through it, median): peer {peer_launch:.1f} ms "
          f"(netns, mount namespace, bind mounts), ours {our_launch:.1f} ms (netns)")
    print(render(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
