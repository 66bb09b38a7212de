"""A kubelet stand-in that behaves like the real device manager, for the demo and the tests.

Modelled on kubelet pkg/kubelet/cm/devicemanager: on start it removes every non-directory entry
in the plugin directory except kubelet_internal_checkpoint, then serves Registration on
kubelet.sock. Register validates the version and the extended resource name, dials the plugin
at <dir>/<endpoint> with authority "localhost", calls GetDevicePluginOptions and then keeps one
ListAndWatch stream per resource whose every message replaces the device set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from agent._pb.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

CHECKPOINT = "kubelet_internal_checkpoint"
_EXT_RESOURCE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


@dataclass
class SeenDevice:
    id: str
    health: str
    numa: tuple[int, ...]


@dataclass
class Endpoint:
    resource: str
    socket: str
    options: api_pb2.DevicePluginOptions
    channel: grpc.aio.Channel
    stub: api_pb2_grpc.DevicePluginStub
    devices: dict[str, SeenDevice] = field(default_factory=dict)
    updates: list[tuple[float, dict[str, SeenDevice]]] = field(default_factory=list)
    stopped: bool = False
    task: asyncio.Task[None] | None = None


class FakeKubelet(api_pb2_grpc.RegistrationServicer):
    def __init__(self, plugin_dir: str) -> None:
        self.plugin_dir = plugin_dir
        self.socket = os.path.join(plugin_dir, "kubelet.sock")
        self.endpoints: dict[str, Endpoint] = {}
        self.registrations: list[tuple[float, str]] = []
        self.rejections: list[str] = []
        self._server: grpc.aio.Server | None = None
        self._changed = asyncio.Condition()

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        os.makedirs(self.plugin_dir, exist_ok=True)
        for name in os.listdir(self.plugin_dir):
            path = os.path.join(self.plugin_dir, name)
            if name != CHECKPOINT and not os.path.isdir(path):
                os.unlink(path)
        server = grpc.aio.server()
        api_pb2_grpc.add_RegistrationServicer_to_server(self, server)
        server.add_insecure_port(f"unix:{self.socket}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        for ep in self.endpoints.values():
            await self._close(ep)
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)

    async def restart(self) -> None:
        """A kubelet restart: sockets deleted, new kubelet.sock, plugins must re-register."""
        await self.stop()
        self.endpoints.clear()
        await self.start()

    # ---------------------------------------------------------------- Registration service
    async def Register(self, request: api_pb2.RegisterRequest,  # type: ignore[override]
                       context: grpc.aio.ServicerContext[api_pb2.RegisterRequest, api_pb2.Empty]) -> api_pb2.Empty:
        problem = self._validate(request)
        if problem:
            self.rejections.append(problem)
            await context.abort(grpc.StatusCode.UNKNOWN, problem)
        sock = os.path.join(self.plugin_dir, request.endpoint)
        channel = grpc.aio.insecure_channel(f"unix:{sock}", options=[("grpc.default_authority", "localhost")])
        stub = api_pb2_grpc.DevicePluginStub(channel)
        try:
            options = await stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=10)
        except grpc.aio.AioRpcError as e:
            await channel.close()
            msg = f"failed to dial device plugin: {e.code().name}"
            self.rejections.append(msg)
            await context.abort(grpc.StatusCode.UNKNOWN, msg)
        old = self.endpoints.get(request.resource_name)
        if old is not None:
            await self._close(old)
        ep = Endpoint(request.resource_name, sock, options, channel, stub)
        self.endpoints[request.resource_name] = ep
        self.registrations.append((time.monotonic(), request.resource_name))
        ep.task = asyncio.create_task(self._list_and_watch(ep))
        return api_pb2.Empty()

    def _validate(self, req: api_pb2.RegisterRequest) -> str:
        if req.version != "v1beta1":
            return f"Requested device plugin version {req.version!r} is not supported by kubelet"
        if not _EXT_RESOURCE.match(req.resource_name) or req.resource_name.split("/")[0].endswith("kubernetes.io"):
            return f"invalid name of device plugin socket: {req.resource_name}"
        if "/" in req.endpoint or not req.endpoint:
            return f"invalid endpoint {req.endpoint!r}"
        return ""

    async def _list_and_watch(self, ep: Endpoint) -> None:
        try:
            async for resp in ep.stub.ListAndWatch(api_pb2.Empty()):
                devices = {d.ID: SeenDevice(d.ID, d.health, tuple(n.ID for n in d.topology.nodes))
                           for d in resp.devices}
                ep.devices = devices
                ep.updates.append((time.monotonic(), devices))
                async with self._changed:
                    self._changed.notify_all()
        except grpc.aio.AioRpcError:
            pass
        ep.stopped = True
        # The real kubelet marks every device of a stopped endpoint unhealthy.
        ep.devices = {k: SeenDevice(v.id, "Unhealthy", v.numa) for k, v in ep.devices.items()}
        async with self._changed:
            self._changed.notify_all()

    async def _close(self, ep: Endpoint) -> None:
        if ep.task is not None:
            ep.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await ep.task
        await ep.channel.close()

    # ---------------------------------------------------------------- what tests ask
    def healthy(self, resource: str) -> list[str]:
        ep = self.endpoints.get(resource)
        return sorted(i for i, d in (ep.devices if ep else {}).items() if d.health == "Healthy")

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async def _wait() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)
        await asyncio.wait_for(_wait(), timeout)

    async def allocate(self, resource: str, ids: list[str]) -> api_pb2.ContainerAllocateResponse:
        resp = await self.endpoints[resource].stub.Allocate(
            api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids)]),
            timeout=10)
        return resp.container_responses[0]

    async def preferred(self, resource: str, available: list[str], must: list[str], size: int) -> list[str]:
        resp = await self.endpoints[resource].stub.GetPreferredAllocation(
            api_pb2.PreferredAllocationRequest(container_requests=[api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size)]),
            timeout=10)
        return list(resp.container_responses[0].deviceIDs)
