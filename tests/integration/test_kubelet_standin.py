"""The kubelet stand-in has the Go kubelet's socket semantics, so tests against it mean something:
kubelet.sock appears (IN_CREATE) before it accepts connections, every Register is recorded with the
kubelet.sock it came in on, and a double registration harms the live one as it does in the kubelet."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agent._pb.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from agent.adapters.inotify import IN_CREATE, Inotify
from agent.adapters.kubelet import register
from agent.errors import KubeletRegistrationError
from agent.sim.kubelet import FakeKubelet

RESOURCE = "example.com/vf"


class StreamsOnDemand(api_pb2_grpc.DevicePluginServicer):
    """A plugin whose ListAndWatch streams each send one device list and then stay open until
    the test ends them one by one."""

    def __init__(self) -> None:
        self.ends: list[asyncio.Event] = []

    async def GetDevicePluginOptions(
        self, request: api_pb2.Empty,
        context: grpc.aio.ServicerContext[api_pb2.Empty, api_pb2.DevicePluginOptions],
    ) -> api_pb2.DevicePluginOptions:
        return api_pb2.DevicePluginOptions()

    async def ListAndWatch(
        self, request: api_pb2.Empty,
        context: grpc.aio.ServicerContext[api_pb2.Empty, api_pb2.ListAndWatchResponse],
    ) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
        end = asyncio.Event()
        self.ends.append(end)
        yield api_pb2.ListAndWatchResponse(devices=[api_pb2.Device(ID="0000:01:00.2", health="Healthy")])
        await end.wait()


def _connect_errno(path: str) -> int:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError as e:
            return e.errno or 0
    return 0


def test_kubelet_sock_appears_before_it_accepts_connections(sim_root: Path) -> None:
    async def body() -> None:
        kubelet = FakeKubelet(str(sim_root / "dp"))
        os.makedirs(kubelet.plugin_dir)
        ino = Inotify()
        ino.watch(kubelet.plugin_dir, IN_CREATE)
        try:
            kubelet.bind()
            assert [e.name for e in ino.read_events()] == ["kubelet.sock"]  # IN_CREATE at bind()
            assert stat.S_ISSOCK(os.stat(kubelet.socket).st_mode)
            assert _connect_errno(kubelet.socket) == errno.ECONNREFUSED
            assert kubelet.started_at is None
            await kubelet.listen()
            assert _connect_errno(kubelet.socket) == 0
            assert kubelet.started_at is not None and kubelet.bound_at is not None
            assert kubelet.socket_inode == os.stat(kubelet.socket).st_ino
        finally:
            ino.close()
            await kubelet.stop()
        assert not os.path.exists(kubelet.socket)
    asyncio.run(body())


def test_every_register_is_recorded_with_its_kubelet_instance_and_socket(sim_root: Path) -> None:
    async def body() -> None:
        plugin = grpc.aio.server()
        api_pb2_grpc.add_DevicePluginServicer_to_server(StreamsOnDemand(), plugin)
        kubelet = FakeKubelet(str(sim_root / "dp"))
        await kubelet.start()
        plugin.add_insecure_port(f"unix:{sim_root / 'dp' / 'vf.sock'}")
        await plugin.start()
        try:
            first_inode = kubelet.socket_inode
            await register(kubelet.socket, "vf.sock", RESOURCE)
            await kubelet.relisten()  # serveWithRetry: a new kubelet.sock, same kubelet instance
            assert kubelet.socket_inode != first_inode and kubelet.instance == 1
            await register(kubelet.socket, "vf.sock", RESOURCE)
            with pytest.raises(KubeletRegistrationError):
                await register(kubelet.socket, "vf.sock", "kubernetes.io/vf")
            assert [(c.instance, c.socket_inode, bool(c.problem)) for c in kubelet.calls] == [
                (1, first_inode, False), (1, kubelet.socket_inode, False), (1, kubelet.socket_inode, True)]
            assert kubelet.registers_per_instance(RESOURCE) == {1: 2}
        finally:
            await kubelet.stop()
            await plugin.stop(0)
    asyncio.run(body())


def test_a_double_register_is_stopped_when_the_first_stream_ends(sim_root: Path) -> None:
    """handler.go: the second Register adds a client; when the first one's stream ends, runClient
    disconnects it and PluginDisconnected stops the resource's endpoint, which is the second,
    live registration: every device turns unhealthy although the plugin still serves."""
    async def body() -> None:
        servicer = StreamsOnDemand()
        plugin = grpc.aio.server()
        api_pb2_grpc.add_DevicePluginServicer_to_server(servicer, plugin)
        kubelet = FakeKubelet(str(sim_root / "dp"))
        await kubelet.start()
        plugin.add_insecure_port(f"unix:{sim_root / 'dp' / 'vf.sock'}")
        await plugin.start()
        try:
            await register(kubelet.socket, "vf.sock", RESOURCE)
            await register(kubelet.socket, "vf.sock", RESOURCE)
            await kubelet.wait_for(lambda: len(servicer.ends) == 2 and bool(kubelet.devices(RESOURCE)))
            first, second = kubelet.clients(RESOURCE)
            assert kubelet.endpoints[RESOURCE] is second and kubelet.healthy(RESOURCE) == ["0000:01:00.2"]
            assert first.task is not None and not first.task.done()  # the old client stays connected
            servicer.ends[0].set()
            await kubelet.wait_for(lambda: second.stopped)
            assert kubelet.healthy(RESOURCE) == [] and kubelet.clients(RESOURCE) == [second]
            assert second.task is not None and not second.task.done()  # its stream is still open
        finally:
            for end in servicer.ends:
                end.set()
            await kubelet.stop()
            await plugin.stop(0)
    asyncio.run(body())
