"""A kubelet stand-in that behaves like the real device manager, for the demo, tests and bench.

Modelled on kubelet pkg/kubelet/cm/devicemanager (manager.go, plugin/v1beta1/{server,client,
handler}.go):

* start: ``CleanupPluginDirectory`` removes every socket in the plugin directory except the
  checkpoint (directories and other files stay), then serves Registration on kubelet.sock;
* Register: rejects a version other than v1beta1 and a resource name that is not an extended
  resource (``IsExtendedResourceName``), with the kubelet's own messages; then dials
  ``<dir>/<endpoint>`` (blocking, 10 s, authority "localhost"), calls GetDevicePluginOptions
  and only then answers; ListAndWatch runs in the background;
* every ListAndWatch message replaces the device set (Healthy vs anything else);
* when the stream ends, every device of the resource becomes unhealthy and the endpoint is
  marked stopped (the kubelet drops it from capacity after a 5 min grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import grpc

from agent._pb.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

CHECKPOINT = "kubelet_internal_checkpoint"
SUPPORTED_VERSIONS = ("v1beta1",)
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"

# k8s.io/apimachinery validation.IsQualifiedName, applied to "requests." + name as the kubelet does.
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def is_extended_resource_name(name: str) -> bool:
    """v1helper.IsExtendedResourceName: '<domain>/<name>', not *kubernetes.io/, not 'requests.'."""
    if "/" not in name or "kubernetes.io/" in name or name.startswith("requests."):
        return False
    prefix, _, short = ("requests." + name).partition("/")
    if "/" in short or not 0 < len(short) <= 63 or not _QUALIFIED_NAME.match(short):
        return False
    return 0 < len(prefix) <= 253 and _DNS1123_SUBDOMAIN.match(prefix) is not None


@dataclass
class SeenDevice:
    id: str
    health: str
    numa: tuple[int, ...]


@dataclass
class Endpoint:
    """One registered plugin, as the kubelet's endpointInfo plus what the tests want to look at."""

    resource: str
    socket: str
    options: api_pb2.DevicePluginOptions
    channel: grpc.aio.Channel
    stub: api_pb2_grpc.DevicePluginAsyncStub
    devices: dict[str, SeenDevice] = field(default_factory=dict)
    updates: list[tuple[float, dict[str, SeenDevice]]] = field(default_factory=list)
    stopped_at: float | None = None
    task: asyncio.Task[None] | None = None

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None


class FakeKubelet(api_pb2_grpc.RegistrationServicer):
    def __init__(self, plugin_dir: str, dial_timeout: float = 10.0) -> None:
        self.plugin_dir = plugin_dir
        self.socket = os.path.join(plugin_dir, "kubelet.sock")
        self.dial_timeout = dial_timeout
        self.endpoints: dict[str, Endpoint] = {}
        self.registrations: list[tuple[float, str]] = []  # (time.monotonic(), resource) per success
        self.rejections: list[str] = []
        self.started_at: float | None = None
        self._server: grpc.aio.Server | None = None
        self._changed = asyncio.Condition()

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        os.makedirs(self.plugin_dir, mode=0o750, exist_ok=True)
        self.cleanup_plugin_directory()
        server = grpc.aio.server()
        api_pb2_grpc.add_RegistrationServicer_to_server(self, server)
        server.add_insecure_port(f"unix:{self.socket}")
        await server.start()
        self._server = server
        self.started_at = time.monotonic()

    def cleanup_plugin_directory(self) -> None:
        """Remove every socket except the checkpoint; directories and plain files are kept."""
        for name in os.listdir(self.plugin_dir):
            path = os.path.join(self.plugin_dir, name)
            if name == CHECKPOINT:
                continue
            try:
                mode = os.stat(path).st_mode
            except OSError:
                continue
            if stat.S_ISSOCK(mode):
                os.unlink(path)

    async def stop(self) -> None:
        for ep in list(self.endpoints.values()):
            await self._close(ep)
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)

    async def await_disconnects(self, timeout: float = 5.0) -> None:
        """Let open ListAndWatch readers see their streams end before stop() cancels them.

        A plugin that just shut down ended its streams, but the kubelet learns that asynchronously;
        cancelling first would skip the disconnect handling (devices marked Unhealthy). A stream still
        open after ``timeout`` is left for stop() to cut, so a plugin that never ends it is visible.
        """
        live = [ep.task for ep in self.endpoints.values() if ep.task is not None and not ep.task.done()]
        if live:
            await asyncio.wait(live, timeout=timeout)

    async def restart(self) -> None:
        """A kubelet restart: sockets deleted, new kubelet.sock, plugins must re-register."""
        await self.stop()
        self.endpoints.clear()
        await self.start()

    # ---------------------------------------------------------------- Registration service
    async def Register(
        self, request: api_pb2.RegisterRequest,
        context: grpc.aio.ServicerContext[api_pb2.RegisterRequest, api_pb2.Empty],
    ) -> api_pb2.Empty:
        problem = self._validate(request)
        if problem:
            self.rejections.append(problem)
            await context.abort(grpc.StatusCode.UNKNOWN, problem)
        sock = os.path.join(self.plugin_dir, request.endpoint)
        channel = grpc.aio.insecure_channel(f"unix:{sock}", options=[("grpc.default_authority", "localhost")])
        stub: api_pb2_grpc.DevicePluginAsyncStub = api_pb2_grpc.DevicePluginStub(channel)
        try:
            async with asyncio.timeout(self.dial_timeout):
                await channel.channel_ready()
        except TimeoutError:
            await channel.close()
            await self._reject(context, f"failed to dial device plugin: {sock}: context deadline exceeded")
        try:
            options = await stub.GetDevicePluginOptions(api_pb2.Empty())
        except grpc.aio.AioRpcError as e:
            await channel.close()
            problem = f"failed to get device plugin options: {e.code().name}: {e.details()}"
            await self._reject(context, problem)
        old = self.endpoints.get(request.resource_name)
        if old is not None:
            await self._close(old)
        ep = Endpoint(request.resource_name, sock, options, channel, stub)
        self.endpoints[request.resource_name] = ep
        self.registrations.append((time.monotonic(), request.resource_name))
        ep.task = asyncio.create_task(self._list_and_watch(ep))
        async with self._changed:
            self._changed.notify_all()
        return api_pb2.Empty()

    async def _reject(self, context: grpc.aio.ServicerContext[api_pb2.RegisterRequest, api_pb2.Empty],
                      problem: str) -> NoReturn:
        self.rejections.append(problem)
        await context.abort(grpc.StatusCode.UNKNOWN, problem)

    def _validate(self, req: api_pb2.RegisterRequest) -> str:
        if req.version not in SUPPORTED_VERSIONS:
            return (f"requested API version {json.dumps(req.version)} is not supported by kubelet. "
                    f"Supported version is {json.dumps(list(SUPPORTED_VERSIONS))}")
        if not is_extended_resource_name(req.resource_name):
            return f"the ResourceName {json.dumps(req.resource_name)} is invalid"
        return ""

    async def _list_and_watch(self, ep: Endpoint) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for resp in ep.stub.ListAndWatch(api_pb2.Empty()):
                ep.devices = {d.ID: SeenDevice(d.ID, HEALTHY if d.health == HEALTHY else UNHEALTHY,
                                               tuple(n.ID for n in d.topology.nodes))
                              for d in resp.devices}
                ep.updates.append((time.monotonic(), ep.devices))
                async with self._changed:
                    self._changed.notify_all()
        # PluginDisconnected -> markResourceUnhealthy: every device of a stopped endpoint is unhealthy.
        ep.stopped_at = time.monotonic()
        ep.devices = {k: SeenDevice(v.id, UNHEALTHY, v.numa) for k, v in ep.devices.items()}
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
        return sorted(i for i, d in (ep.devices if ep else {}).items() if d.health == HEALTHY)

    def devices(self, resource: str) -> dict[str, SeenDevice]:
        ep = self.endpoints.get(resource)
        return dict(ep.devices) if ep else {}

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can hang when the waiter is cancelled.
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    async def allocate(self, resource: str, ids: list[str]) -> api_pb2.ContainerAllocateResponse:
        """One Allocate RPC with one container request, as the kubelet issues it per container."""
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
