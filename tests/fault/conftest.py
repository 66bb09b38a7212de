"""The fault tier: the real `sriov-rdma-agent serve` process on a simulated node, hurt on purpose.

Every test spawns `python -m agent serve` (optionally inside a throw-away network namespace, so
real netlink and uevents of veths named like the PFs reach it), talks to it only the way the
kubelet, an operator or the kernel would (unix sockets, signals, files, TCP), and reads its JSON
log. Resource use is read from /proc/<pid> and the agent's own asyncio task gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.demo import demo_settings
from agent.settings import Settings
from tests.conftest import free_port

pytestmark = pytest.mark.fault

SERVE_FLAGS = ("config", "sysfs_root", "dev_root", "device_plugin_dir", "devinfo_dir", "pod_resources_socket",
               "metrics_address", "health_address", "status_socket")


@dataclass(frozen=True)
class Usage:
    """What a leak would grow: resident memory, open fds, OS threads, asyncio tasks."""

    rss_kib: int
    fds: int
    threads: int
    tasks: int

    def __str__(self) -> str:
        return (f"RSS {self.rss_kib / 1024:.1f} MiB, {self.fds} fds, {self.threads} threads, "
                f"{self.tasks} tasks")


@dataclass
class Serve:
    """One `serve` process and where to find everything it serves."""

    settings: Settings
    log_path: Path
    netns: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def metrics_port(self) -> int:
        return int(self.settings.metrics_address.rsplit(":", 1)[1])

    @property
    def health_port(self) -> int:
        return int(self.settings.health_address.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *extra: str) -> Serve:
        args = [sys.executable, "-m", "agent", "serve", "--log-format", "json"]
        for name in SERVE_FLAGS:
            args += [f"--{name.replace('_', '-')}", str(getattr(self.settings, name))]
        if self.netns:
            args = ["ip", "netns", "exec", self.netns, *args]
        self._log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SRIOV_RDMA_AGENT_")}
        self.proc = subprocess.Popen([*args, *extra], stdout=self._log, stderr=self._log, env=env)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                line = json.loads(raw)
                if isinstance(line, dict):
                    out.append(line)
        return out

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_log(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        return await until(lambda: next((x for x in self.lines() if pred(x)), None), timeout,
                           lambda: f"no such log line; log:\n{self.text()[-3000:]}")

    def metrics(self) -> str:
        """GET /metrics (from inside the agent's network namespace when it has one)."""
        if self.netns:  # a helper process: forking this one (pyroute2's way) is unsafe with grpc threads
            code = ("import sys, urllib.request as u; sys.stdout.write(u.urlopen("
                    f"'http://127.0.0.1:{self.metrics_port}/metrics', timeout=10).read().decode())")
            out = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c", code],
                                 check=False, capture_output=True, text=True, timeout=30)
            if out.returncode != 0:
                raise ConnectionError(out.stderr[-500:])
            return out.stdout
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(("127.0.0.1", self.metrics_port))
            sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            chunks = []
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
        return b"".join(chunks).decode().partition("\r\n\r\n")[2]

    def answering(self) -> bool:
        """The metrics endpoint answers (the process is up); fails the test if the process died."""
        if not self.alive():
            code = self.proc.returncode if self.proc else None
            raise AssertionError(f"serve exited {code}:\n{self.text()}")
        try:
            self.metrics()
        except OSError:
            return False
        return True

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there are none)."""
        total = 0.0
        for line in self.metrics().splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
            if not m or m.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(m.group(4))
        return total

    def usage(self) -> Usage:
        status = Path(f"/proc/{self.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        tasks = int(self.metric("sriov_rdma_asyncio_tasks"))
        assert tasks > 0, "the agent's asyncio task gauge is missing"
        return Usage(rss, fds, threads, tasks)

    async def settled_usage(self, baseline: Usage, timeout: float = 20.0) -> Usage:
        """Usage once transient work has drained: tasks/fds/threads back near ``baseline`` or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            now = await asyncio.to_thread(self.usage)
            if (now.tasks <= baseline.tasks and now.fds <= baseline.fds + 2
                    and now.threads <= baseline.threads + 1) or time.monotonic() > deadline:
                return now
            await asyncio.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode


async def until(probe: Callable[[], Any], timeout: float = 30.0,
                why: Callable[[], str] = lambda: "condition") -> Any:
    """Poll ``probe`` (a cheap check of files or state) until it is truthy; bounded, never a bare sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {why()}")
        await asyncio.sleep(0.05)


def serve_settings(root: Path, **overrides: Any) -> Settings:
    """Every path under ``root``, config in its own directory (a ConfigMap mount), loopback ports."""
    (root / "cm").mkdir(exist_ok=True)
    base: dict[str, Any] = {"config": str(root / "cm/config.yaml"),
                            "metrics_address": f"127.0.0.1:{free_port()}",
                            "health_address": f"127.0.0.1:{free_port()}"}
    return demo_settings(root, **{**base, **overrides})


@pytest.fixture
def spawn(sim_root: Path) -> Iterator[Callable[..., Serve]]:
    """spawn(settings, netns=None) -> a started Serve; each is stopped (SIGKILL if need be) at the end."""
    started: list[Serve] = []

    def _spawn(settings: Settings, *extra: str, ns: str | None = None) -> Serve:
        serve = Serve(settings, sim_root / f"serve-{len(started)}.log", ns)
        started.append(serve.start(*extra))
        return serve

    yield _spawn
    for serve in started:
        serve.stop(signal.SIGKILL if serve.alive() else signal.SIGTERM)


# Real netlink and uevents: the network-namespace fixtures of the netns tier.
from tests.netns.conftest import netns, short_tmp, veth_node  # noqa: E402, F401
