"""Hot reload of a hostile or broken config file: rejected with a short error, the last good config
kept, the agent serving throughout, and the parse never on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import agent.services.lifecycle
from agent.adapters.executor import Timeouts
from agent.app import App, build_agent
from agent.config import Config, parse_config
from agent.services.lifecycle import Lifecycle
from agent.sim.kernel import SimKernel, SimNetlink
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import dgx_spark
from tests.conftest import CX7_CONFIG, RESOURCE, node_settings
from tests.unit.core.test_config_limits import laughs


@contextlib.asynccontextmanager
async def serving(sim_root: Path) -> AsyncIterator[tuple[App, Lifecycle, FakeKubelet, asyncio.Task[None]]]:
    """The agent with its VF lifecycle (and so the config watcher) on a simulated node."""
    node = dgx_spark(sim_root / "node")
    settings = node_settings(node.root)
    Path(settings.config).write_text(CX7_CONFIG)
    kubelet = FakeKubelet(settings.device_plugin_dir)
    await kubelet.start()
    nl = SimNetlink(node)
    agent_ = build_agent(settings, parse_config(CX7_CONFIG), writer=SimKernel(node, netlink=nl), netlink=nl,
                         timeouts=Timeouts(vf_wait=5))
    lc = agent_.lifecycle
    assert lc is not None
    runner = asyncio.create_task(agent_.run())
    try:
        await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == 4, timeout=10)
        yield agent_, lc, kubelet, runner
    finally:
        await agent_.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await kubelet.stop()


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def reloads(agent_: App, result: str) -> float | None:
    """The exported counter, as a scrape reads it."""
    assert agent_.metrics is not None
    return agent_.metrics.registry.get_sample_value("sriov_rdma_config_reloads_total", {"result": result})


def _write(settings_config: str, data: bytes) -> None:
    """Replace the file as an editor or a ConfigMap update does (one close-after-write event)."""
    Path(settings_config).write_bytes(data)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", [
    pytest.param(CX7_CONFIG.encode().replace(b"enP2p1s0f0np0", b"enP2p1s0f0n\xe9p0"), id="non-utf8"),
    pytest.param(laughs("version").encode(), id="billion-laughs"),
])
def test_a_bad_config_on_reload_is_rejected_and_the_agent_keeps_serving(sim_root: Path, bad: bytes) -> None:
    async def body() -> None:
        async with serving(sim_root) as (agent_, lc, kubelet, runner):
            good = agent_.resources.config
            _write(agent_.settings.config, bad)
            await _until(lambda: reloads(agent_, "invalid") == 1)
            assert not runner.done(), "a rejected config must never end the agent"
            assert agent_.resources.config is good
            assert lc.config_error.startswith("config: <file>: ") and len(lc.config_error) < 300
            assert len(kubelet.healthy(RESOURCE)) == 4
            resp = await kubelet.allocate(RESOURCE, ["0002:01:00.2"])  # still serving
            assert resp.envs["PCIDEVICE_NVIDIA_COM_CX7_QSFP"] == "0002:01:00.2"
            # The next good file is adopted as usual.
            _write(agent_.settings.config, CX7_CONFIG.replace("numVfs: 4", "numVfs: 3").encode())
            await _until(lambda: reloads(agent_, "ok") == 1)
            assert agent_.resources.config.resources[0].pfs[0].num_vfs == 3 and lc.config_error == ""
    asyncio.run(body())


def test_reload_parses_in_a_worker_thread(sim_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large file (up to the 1 MiB limit) takes a moment to parse: health answers and ListAndWatch
    streams must not wait for it."""
    threads: list[threading.Thread] = []
    real = agent.services.lifecycle.parse_config

    def recording(data: str | bytes) -> Config:
        threads.append(threading.current_thread())
        return real(data)

    monkeypatch.setattr(agent.services.lifecycle, "parse_config", recording)
    node = dgx_spark(sim_root / "node")
    settings = node_settings(node.root)
    Path(settings.config).write_text(CX7_CONFIG)
    agent_ = build_agent(settings, parse_config(CX7_CONFIG), netlink=SimNetlink(node),
                         timeouts=Timeouts(vf_wait=5))
    lc = agent_.lifecycle
    Path(settings.config).write_text(CX7_CONFIG.replace("numVfs: 4", "numVfs: 2"))
    assert asyncio.run(lc.reload_config()) is True
    assert threads and all(t is not threading.main_thread() for t in threads)


def test_a_failing_reload_closes_the_inotify_watch_cleanly(sim_root: Path) -> None:
    """A reload that raises is the guard's to log and retry; whatever then ends the watch loop (here a
    cancel), the event generator is closed before its fd: no 'Task exception was never retrieved ...
    Invalid file descriptor: -1' afterwards."""
    node = dgx_spark(sim_root / "node")
    settings = node_settings(node.root)
    Path(settings.config).write_text(CX7_CONFIG)
    agent_ = build_agent(settings, parse_config(CX7_CONFIG), netlink=SimNetlink(node),
                         timeouts=Timeouts(vf_wait=5))
    lc = agent_.lifecycle
    loop_errors: list[dict[str, Any]] = []

    def broken_reload(force: bool = False) -> bool:  # raises on the call, before anything is awaited
        raise RuntimeError("reload blew up")

    lc.reload_config = broken_reload  # type: ignore[method-assign]

    async def body() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, c: loop_errors.append(c))
        watcher = asyncio.create_task(lc.watch_config())
        await asyncio.sleep(0.1)  # the watch is in place
        Path(settings.config).write_text(CX7_CONFIG + "\n")
        await _until(lambda: agent_.stats.get("callback_errors", callback="config reload") >= 1)
        assert not watcher.done(), "a failing reload must not end the watch"
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
        del watcher
        gc.collect()
        for _ in range(5):
            await asyncio.sleep(0)
    asyncio.run(body())
    assert not loop_errors, loop_errors
