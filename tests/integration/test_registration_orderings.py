"""Registration in every order the kubelet and the agent can come and go, against the stand-in's
Go socket semantics (sockets wiped at start, kubelet.sock bound before it listens).

Every test makes each backoff wait 60 s (``slow_backoff``), longer than any wait here: an agent that
registers at all did so because an event woke it, never because a timer ran out. Each one ends by
checking, after the agent has stopped, that every kubelet instance got exactly one Register.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from agent._pb.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from agent.adapters import kubelet as kubelet_adapter
from agent.adapters.inotify import IN_CREATE, IN_DELETE, IN_Q_OVERFLOW, Inotify
from agent.adapters.kubelet import PluginLifecycle, register
from agent.app import App
from agent.errors import KubeletRegistrationError, PluginSocketWipedError
from agent.settings import Settings
from agent.sim.kubelet import FakeKubelet
from tests.conftest import CX7_CONFIG, RESOURCE, RunAgent
from tests.integration.test_kubelet_standin import StreamsOnDemand

VFS = ["0002:01:00.2", "0002:01:00.3", "0002:01:00.4", "0002:01:00.5"]
ENDPOINT = "nvidia.com_cx7_qsfp.sock"
WAIT = 20.0  # only against hangs: far below the 60 s backoff, far above any prompt registration


@pytest.fixture(autouse=True)
def slow_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kubelet_adapter._Backoff, "next_delay", lambda self: 60.0)


async def until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """For agent-side state nothing notifies about: re-check on every loop turn, bounded."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def registered_with_current(kubelet: FakeKubelet, agent: App) -> None:
    """The current kubelet instance accepted our Register, holds our devices, and the agent knows."""
    instance = kubelet.instance
    lifecycle = agent.plugins.lifecycles[RESOURCE]
    await kubelet.wait_for(lambda: kubelet.registers_per_instance(RESOURCE)[instance] >= 1
                           and kubelet.healthy(RESOURCE) == VFS, timeout=WAIT)
    await until(lambda: lifecycle.registered)


def assert_one_register_per_instance(kubelet: FakeKubelet, instances: int) -> None:
    assert kubelet.registers_per_instance(RESOURCE) == dict.fromkeys(range(1, instances + 1), 1)


async def lifecycle_of(agent: App) -> PluginLifecycle:
    """The resource's lifecycle, once App.run() has made it."""
    await until(lambda: RESOURCE in agent.plugins.lifecycles)
    return agent.plugins.lifecycles[RESOURCE]


def test_kubelet_up_before_the_agent(sim_settings: Settings, run_agent: RunAgent) -> None:
    async def body() -> FakeKubelet:
        async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
            await registered_with_current(kubelet, agent)
            assert (await lifecycle_of(agent)).attempts == 1
        return kubelet
    assert_one_register_per_instance(asyncio.run(body()), 1)


def test_agent_up_before_the_kubelet(sim_settings: Settings, run_agent: RunAgent) -> None:
    async def body() -> FakeKubelet:
        async with run_agent(sim_settings, CX7_CONFIG, start_kubelet=False) as (agent, kubelet):
            lifecycle = await lifecycle_of(agent)
            await until(lambda: lifecycle.attempts >= 1)  # failed: now in a 60 s backoff
            assert not lifecycle.registered
            await kubelet.start()
            await registered_with_current(kubelet, agent)
        return kubelet
    assert_one_register_per_instance(asyncio.run(body()), 1)


def test_kubelet_restart_wipes_every_socket_and_gets_one_register(sim_settings: Settings,
                                                                  run_agent: RunAgent) -> None:
    async def body() -> FakeKubelet:
        async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
            for _ in range(3):
                sock = os.path.join(sim_settings.device_plugin_dir, "nvidia.com_cx7_qsfp.sock")
                before = os.stat(sock).st_ino
                await kubelet.restart()  # "our socket deleted" and "new kubelet.sock" both fire
                await registered_with_current(kubelet, agent)
                assert os.stat(sock).st_ino != before
                # One client, live: a second Register would have left two, and stopped one on exit.
                assert len(kubelet.clients(RESOURCE)) == 1 and not kubelet.endpoints[RESOURCE].stopped
        return kubelet
    assert_one_register_per_instance(asyncio.run(body()), 4)


def test_kubelet_stopped_then_started_much_later(sim_settings: Settings, run_agent: RunAgent) -> None:
    async def body() -> FakeKubelet:
        async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
            lifecycle = await lifecycle_of(agent)
            await kubelet.stop()
            await until(lambda: not lifecycle.registered)
            attempts = lifecycle.attempts
            await asyncio.sleep(1.0)  # "much later": the agent waits on events, it does not poll
            assert lifecycle.attempts == attempts
            await kubelet.start()
            await registered_with_current(kubelet, agent)
            assert lifecycle.attempts == attempts + 1
        return kubelet
    assert_one_register_per_instance(asyncio.run(body()), 2)


def test_kubelet_starting_as_we_serve_wipes_our_socket_under_an_in_flight_register(
        sim_settings: Settings, run_agent: RunAgent) -> None:
    """Node boot: the kubelet's wipe of our socket lands after our "socket intact" check, our Register
    reaches the new kubelet.sock, and the kubelet dials the socket that is gone. Serving again at once
    lets the kubelet's dial find us: that Register completes, and it is the only one."""
    async def body() -> FakeKubelet:
        async with run_agent(sim_settings, CX7_CONFIG, start_kubelet=False) as (agent, kubelet):
            lifecycle = await lifecycle_of(agent)
            await until(lambda: lifecycle.attempts >= 1)  # failed: now in a 60 s backoff
            sock = os.path.join(sim_settings.device_plugin_dir, "nvidia.com_cx7_qsfp.sock")
            wiped: list[int] = []
            arrived: list[str] = []  # every Register that reached the kubelet, answered or not

            async def wipe_then_dial(request: api_pb2.RegisterRequest) -> str:
                arrived.append(request.resource_name)
                if not wiped:  # CleanupPluginDirectory, racing in after the agent's check
                    wiped.append(os.stat(sock).st_ino if os.path.exists(sock) else 0)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(sock)
                return ""

            kubelet.before_register = wipe_then_dial
            await kubelet.start()
            await registered_with_current(kubelet, agent)
            assert wiped and os.stat(sock).st_ino != wiped[0]  # served again, under the same Register
            assert arrived == [RESOURCE] and not kubelet.rejections
        return kubelet
    assert_one_register_per_instance(asyncio.run(body()), 1)


def test_no_register_is_sent_for_a_socket_wiped_after_our_check(sim_settings: Settings) -> None:
    """A kubelet starting wipes every socket before it listens, so once we are connected to it a wipe
    has happened already: the check made then stops the Register, and the kubelet sees none."""
    async def body() -> None:
        arrived: list[str] = []

        async def record(request: api_pb2.RegisterRequest) -> str:
            arrived.append(request.resource_name)
            return ""

        kubelet = FakeKubelet(sim_settings.device_plugin_dir, before_register=record)
        await kubelet.start()
        try:
            with pytest.raises(PluginSocketWipedError):
                await register(kubelet.socket, ENDPOINT, RESOURCE, still_serving=lambda: False)
            assert arrived == []
            checked: list[bool] = []

            def serving() -> bool:
                checked.append(True)
                return True

            with pytest.raises(KubeletRegistrationError):  # nothing serves the endpoint: the dial fails
                await register(kubelet.socket, ENDPOINT, RESOURCE, timeout=1, still_serving=serving)
            assert checked == [True] and arrived == [RESOURCE]
        finally:
            await kubelet.stop()
    asyncio.run(body())


def test_kubelet_sock_bound_but_not_yet_listening(sim_settings: Settings, run_agent: RunAgent,
                                                  caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Go's net.Listen: IN_CREATE fires at bind(), connect() is refused until listen(), and nothing
    on the filesystem marks the listen(). The refusals must not push the agent into its backoff."""
    monkeypatch.setattr(kubelet_adapter, "LISTEN_GRACE_S", 60.0)  # however slow this machine is

    async def body() -> FakeKubelet:
        async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
            await kubelet.stop()
            kubelet.bind()  # a new kubelet: every socket wiped, kubelet.sock bound, not listening
            await until(lambda: any("Connection refused" in r.getMessage() for r in caplog.records))
            assert kubelet.registers_per_instance(RESOURCE)[2] == 0
            await kubelet.listen()
            await registered_with_current(kubelet, agent)
            assert kubelet.started_at is not None
            assert [c.at >= kubelet.started_at for c in kubelet.calls if c.instance == 2] == [True]
        return kubelet
    assert_one_register_per_instance(asyncio.run(body()), 2)


@pytest.mark.parametrize("outcome", ["rejected", "accepted"])
def test_new_kubelet_sock_while_a_register_is_in_flight(sim_settings: Settings, run_agent: RunAgent,
                                                       outcome: str) -> None:
    """The kubelet replaces kubelet.sock (serveWithRetry: same instance) while our Register waits
    for its answer. Rejected: the IN_CREATE seen meanwhile must make the retry immediate.
    Accepted: the kubelet that answered is the one on the new kubelet.sock: no second Register."""
    arrived, release = asyncio.Event(), asyncio.Event()
    problem = "failed to dial device plugin: context deadline exceeded" if outcome == "rejected" else ""

    async def hold_first(_request: object) -> str:
        if arrived.is_set():
            return ""
        arrived.set()
        await release.wait()
        return problem

    async def body() -> FakeKubelet:
        async with run_agent(sim_settings, CX7_CONFIG, start_kubelet=False) as (agent, kubelet):
            lifecycle = await lifecycle_of(agent)
            kubelet.before_register = hold_first
            await kubelet.start()
            await arrived.wait()
            held = lifecycle.attempts  # the attempt in flight is the last one made
            first_inode = kubelet.socket_inode
            await kubelet.relisten()
            await until(lambda: lifecycle._appeared is not None  # the agent has seen the IN_CREATE
                        and lifecycle._appeared[0] == kubelet.socket_inode)
            release.set()
            await registered_with_current(kubelet, agent)
            accepted = [c.socket_inode for c in kubelet.calls if not c.problem]
            assert accepted == ([kubelet.socket_inode] if outcome == "rejected" else [first_inode])
            assert lifecycle.attempts == (held + 1 if outcome == "rejected" else held)
        return kubelet
    assert_one_register_per_instance(asyncio.run(body()), 1)


def test_inotify_queue_overflow_loses_the_restart_events(sim_settings: Settings, run_agent: RunAgent,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A real overflow at the kernel's own limit: the agent's event loop is kept from reading while
    more events than fs.inotify.max_queued_events pile up, then the kubelet restarts. The queue is
    full, so the kernel drops our socket's deletion and kubelet.sock's creation; only
    IN_Q_OVERFLOW says something happened."""
    with open("/proc/sys/fs/inotify/max_queued_events") as f:
        limit = int(f.read())

    async def body() -> FakeKubelet:
        async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
            lifecycle = await lifecycle_of(agent)
            await kubelet.stop()
            await until(lambda: not lifecycle.registered)
            witness = Inotify()  # same limit as the agent's: shows which events the kernel kept
            witness.watch(kubelet.plugin_dir, IN_CREATE | IN_DELETE)
            try:
                # No await from here to listen(): the agent cannot read its inotify queue.
                for i in range(limit // 2 + 16):
                    junk = os.path.join(kubelet.plugin_dir, f"junk-{i}")
                    os.close(os.open(junk, os.O_CREAT | os.O_WRONLY, 0o600))
                    os.unlink(junk)
                kubelet.bind()  # wipes our socket, creates kubelet.sock: both events dropped
                kept = witness.read_events()
                while batch := witness.read_events():
                    kept += batch
            finally:
                witness.close()
            assert any(e.mask & IN_Q_OVERFLOW for e in kept)
            assert not {e.name for e in kept} & {"kubelet.sock", "nvidia.com_cx7_qsfp.sock"}
            await kubelet.listen()
            await registered_with_current(kubelet, agent)
        return kubelet
    assert_one_register_per_instance(asyncio.run(body()), 2)
    assert any("inotify queue overflowed" in r.getMessage() for r in caplog.records)


def test_a_refused_connect_does_not_hold_back_the_next_attempt(sim_root: Path) -> None:
    """grpc-core shares a subchannel between channels with the same target and arguments, and
    keeps one whose connect was refused in reconnect backoff (1 s and up). Another resource's
    attempt, still open, must not make our next Register fail fast once the kubelet listens."""
    async def body() -> None:
        kubelet = FakeKubelet(str(sim_root / "dp"))
        kubelet.bind()
        plugin = grpc.aio.server()
        api_pb2_grpc.add_DevicePluginServicer_to_server(StreamsOnDemand(), plugin)
        plugin.add_insecure_port(f"unix:{sim_root / 'dp' / 'vf.sock'}")
        await plugin.start()
        other = grpc.aio.insecure_channel(f"unix:{kubelet.socket}", options=kubelet_adapter._CHANNEL_OPTIONS)
        try:
            with pytest.raises(grpc.aio.AioRpcError):
                await api_pb2_grpc.RegistrationStub(other).Register(api_pb2.RegisterRequest(), timeout=5)
            with pytest.raises(KubeletRegistrationError) as refused:
                await register(kubelet.socket, "vf.sock", "example.com/vf")
            assert refused.value.unreachable and "Connection refused" in refused.value.reason
            await kubelet.listen()
            await register(kubelet.socket, "vf.sock", "example.com/vf")
            assert kubelet.registers_per_instance("example.com/vf") == {1: 1}
        finally:
            await other.close()
            await kubelet.stop()
            await plugin.stop(0)
    asyncio.run(body())
