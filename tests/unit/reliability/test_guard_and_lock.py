"""The event-callback guard, the node lock, the PodResources cache and when VFs may be written."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

import pytest

from agent.adapters.nodelock import AlreadyRunningError, NodeLock, holder_pid, lock_name
from agent.adapters.podresources import CachedPodDirectory, PodResourcesUnavailableError
from agent.app import writes_enabled
from agent.core.status import PodRef
from agent.services.guard import guarded
from agent.stats import Stats


def test_a_failing_callback_is_logged_once_counted_retried_and_recovers(
        caplog: pytest.LogCaptureFixture) -> None:
    stats = Stats()
    reports: list[str] = []
    calls: list[str] = []

    async def rescan(reason: str) -> None:
        calls.append(reason)
        if len(calls) < 4:
            raise ValueError("garbage in sriov_numvfs")

    async def body() -> None:
        await asyncio.wait_for(guarded("uevent", rescan, stats, report=reports.append)("PCI change"), 10)

    with caplog.at_level(logging.INFO, logger="agent.services.guard"):
        asyncio.run(body())
    assert calls == ["PCI change"] * 4  # the same call, retried until it went through
    assert stats.get("callback_errors", callback="uevent") == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "garbage in sriov_numvfs" in errors[0].getMessage()
    assert any(r.getMessage() == "uevent recovered" for r in caplog.records)
    assert reports == ["ValueError: garbage in sriov_numvfs", ""]


def test_a_guarded_root_task_that_keeps_running_counts_as_recovered() -> None:
    reports: list[str] = []
    started = 0

    async def watcher() -> None:
        nonlocal started
        started += 1
        if started == 1:
            raise OSError(24, "Too many open files")
        await asyncio.Event().wait()  # a watcher: runs until cancelled

    async def body() -> None:
        task = asyncio.create_task(guarded("link watcher", watcher, report=reports.append)())
        while reports != ["OSError: [Errno 24] Too many open files", ""]:
            await asyncio.sleep(0.05)
        task.cancel()  # cancellation passes straight through the guard
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(body(), 10))


def test_the_node_lock_admits_one_agent_and_names_the_holder(tmp_path: Path) -> None:
    name = lock_name(str(tmp_path / "device-plugins")) + f":{os.getpid()}"

    async def body() -> None:
        first = NodeLock(name)
        first.acquire()
        first.serve()
        try:
            with pytest.raises(AlreadyRunningError) as err:
                NodeLock(name).acquire()
            assert err.value.pid == os.getpid() and f"pid {os.getpid()}" in str(err.value)
        finally:
            first.close()
        again = NodeLock(name)  # released the moment its holder lets go (or dies): no stale lock
        again.acquire()
        again.close()

    asyncio.run(body())


def test_the_holder_pid_is_unknown_when_nobody_answers() -> None:
    name = f"sriov-rdma-agent:test-nobody-{os.getpid()}"
    assert holder_pid(name) is None
    with socket.socket(socket.AF_UNIX) as s:
        s.bind("\0" + name)  # bound but not listening: a connect is refused
        assert holder_pid(name) is None


def test_a_long_plugin_dir_gets_a_hashed_lock_name() -> None:
    name = lock_name("/" + "x" * 200)
    assert name.startswith("sriov-rdma-agent:") and len(name.encode()) <= 107
    assert lock_name("/var/lib/kubelet/device-plugins") == "sriov-rdma-agent:/var/lib/kubelet/device-plugins"


class _Pods:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.gate = asyncio.Event()

    async def device_owners(self) -> dict[tuple[str, str], PodRef]:
        self.calls += 1
        await self.gate.wait()
        if self.fail:
            raise PodResourcesUnavailableError("/pr.sock", "UNAVAILABLE")
        return {("r", "0000:00:00.2"): PodRef("ns", "pod", "c")}


def test_status_bursts_share_one_podresources_call_per_max_age() -> None:
    now = [0.0]

    async def body() -> None:
        pods = _Pods()
        cache = CachedPodDirectory(pods, max_age=2.0, clock=lambda: now[0])
        burst = [asyncio.create_task(cache.device_owners()) for _ in range(50)]
        await asyncio.sleep(0)
        pods.gate.set()
        assert all(len(r) == 1 for r in await asyncio.gather(*burst))
        assert pods.calls == 1
        now[0] = 1.9
        await cache.device_owners()
        assert pods.calls == 1
        now[0] = 2.5
        pods.fail = True
        for _ in range(3):  # the failure is remembered as long as an answer would be
            with pytest.raises(PodResourcesUnavailableError):
                await cache.device_owners()
        assert pods.calls == 2

    asyncio.run(body())


def test_vf_writes_follow_the_sysfs_mount_not_the_path(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / /host/sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw\n"
        "23 1 0:22 / /sim/sys rw,relatime shared:8 - tmpfs tmpfs rw\n")
    assert writes_enabled("/", str(mountinfo))
    assert writes_enabled("/host", str(mountinfo))  # the DaemonSet mounts the host's /sys at /host/sys
    assert not writes_enabled("/sim", str(mountinfo))  # a simulated node on tmpfs
    assert not writes_enabled("/nowhere", str(tmp_path / "missing"))
