"""The kubelet device-plugin gRPC server (v1beta1) for one resource, on a unix socket.

Translates protobuf <-> model values only; what to answer is decided by a PluginBackend.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import grpc

from agent._pb.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from agent.core.inventory import MAX_CONTAINER_REQUESTS
from agent.errors import AllocationError, PluginSocketError, shorten
from agent.logs import ctx
from agent.model import ContainerAllocation, ResourceView

log = logging.getLogger(__name__)

# sizeof(sockaddr_un.sun_path) is 108 on Linux, one byte of it the terminating NUL.
MAX_SOCKET_PATH = 107


class PluginBackend(Protocol):
    """What the server needs from the rest of the agent for one resource."""

    def current(self) -> tuple[int, ResourceView]: ...

    async def changed(self, after_version: int) -> tuple[int, ResourceView]: ...

    def allocate(self, requests: Sequence[Sequence[str]]) -> list[ContainerAllocation]: ...

    def preferred(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]: ...


def view_to_proto(view: ResourceView) -> api_pb2.ListAndWatchResponse:
    devices = []
    for d in view.devices:
        topo = api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=d.numa_node)]) if d.numa_node >= 0 else None
        devices.append(api_pb2.Device(ID=d.id, health=d.health.value, topology=topo))
    return api_pb2.ListAndWatchResponse(devices=devices)


def allocation_to_proto(a: ContainerAllocation) -> api_pb2.ContainerAllocateResponse:
    return api_pb2.ContainerAllocateResponse(
        envs=a.envs,
        devices=[api_pb2.DeviceSpec(container_path=d.container_path, host_path=d.host_path,
                                    permissions=d.permissions) for d in a.devices],
    )


class DevicePluginServicer(api_pb2_grpc.DevicePluginServicer):
    def __init__(self, resource_name: str, backend: PluginBackend,
                 on_allocate: Callable[[float, bool], None] | None = None) -> None:
        self.resource_name = resource_name
        self.backend = backend
        self.on_allocate = on_allocate
        self._stopping = asyncio.Event()

    def stop_streams(self) -> None:
        self._stopping.set()

    def reset(self) -> None:
        """Arm the servicer for a new server generation (streams of the old one stay stopped)."""
        self._stopping = asyncio.Event()

    async def GetDevicePluginOptions(
        self, request: api_pb2.Empty,
        context: grpc.aio.ServicerContext[api_pb2.Empty, api_pb2.DevicePluginOptions],
    ) -> api_pb2.DevicePluginOptions:
        return api_pb2.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)

    async def ListAndWatch(
        self, request: api_pb2.Empty,
        context: grpc.aio.ServicerContext[api_pb2.Empty, api_pb2.ListAndWatchResponse],
    ) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
        """The full device list now and again after every change, until the server stops."""
        version, view = self.backend.current()
        log.info("ListAndWatch opened; sending %d devices", len(view.devices),
                 extra=ctx("list-and-watch", resource=self.resource_name))
        yield view_to_proto(view)
        # Both waits end with the stream: a kubelet that hangs up (grpc cancels this handler) must
        # not leave a task parked on the hub until the next device change.
        stop = asyncio.ensure_future(self._stopping.wait())
        change: asyncio.Future[tuple[int, ResourceView]] | None = None
        try:
            while not self._stopping.is_set():
                change = asyncio.ensure_future(self.backend.changed(version))
                done, _ = await asyncio.wait({change, stop}, return_when=asyncio.FIRST_COMPLETED)
                if change not in done:
                    break
                version, view = change.result()
                yield view_to_proto(view)
        finally:
            stop.cancel()
            if change is not None:
                change.cancel()

    async def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest,
        context: grpc.aio.ServicerContext[api_pb2.PreferredAllocationRequest,
                                          api_pb2.PreferredAllocationResponse],
    ) -> api_pb2.PreferredAllocationResponse:
        out = []
        try:
            if len(request.container_requests) > MAX_CONTAINER_REQUESTS:
                raise AllocationError(f"<{len(request.container_requests)} requests>",
                                      f"at most {MAX_CONTAINER_REQUESTS} container requests in one call")
            for req in request.container_requests:
                ids = self.backend.preferred(list(req.available_deviceIDs), list(req.must_include_deviceIDs),
                                             req.allocation_size)
                out.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=ids))
        except AllocationError as e:
            log.warning("preferred allocation refused: %s", e,
                        extra=ctx("preferred-allocation", e.device, resource=self.resource_name,
                                  reason=e.reason))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return api_pb2.PreferredAllocationResponse(container_responses=out)

    async def Allocate(
        self, request: api_pb2.AllocateRequest,
        context: grpc.aio.ServicerContext[api_pb2.AllocateRequest, api_pb2.AllocateResponse],
    ) -> api_pb2.AllocateResponse:
        """One response per container request; one bad request fails the whole call, with no side effect.

        The client's IDs are echoed only cut short (errors.shorten): a 1 MB ID must give a short
        INVALID_ARGUMENT, not a status too large for gRPC metadata, nor a megabyte log line.
        """
        start = time.perf_counter()
        requests = [list(req.devices_ids) for req in request.container_requests]
        try:
            allocs = self.backend.allocate(requests)
        except AllocationError as e:
            log.warning("allocate refused: %s", e,
                        extra=ctx("allocate", e.device, resource=self.resource_name, reason=e.reason))
            if self.on_allocate:
                self.on_allocate(time.perf_counter() - start, False)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        for ids in requests:
            joined = shorten(",".join(ids), 200)
            log.info("allocated %s", joined, extra=ctx("allocate", joined, resource=self.resource_name))
        if self.on_allocate:
            self.on_allocate(time.perf_counter() - start, True)
        return api_pb2.AllocateResponse(container_responses=[allocation_to_proto(a) for a in allocs])

    async def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest,
        context: grpc.aio.ServicerContext[api_pb2.PreStartContainerRequest,
                                          api_pb2.PreStartContainerResponse],
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()


class DevicePluginServer:
    """A grpc.aio server on <device-plugin-dir>/<socket_name>, mode 0600."""

    def __init__(self, socket_path: str, servicer: DevicePluginServicer) -> None:
        self.socket_path = socket_path
        self.servicer = servicer
        self._server: grpc.aio.Server | None = None
        self.inode: int | None = None

    async def start(self) -> None:
        """Bind and serve. A socket the kubelet wipes before we own it leaves socket_intact() False,
        so the caller serves again, exactly as for a wipe an instant later."""
        path_bytes = len(os.fsencode(self.socket_path))
        if path_bytes > MAX_SOCKET_PATH:
            raise PluginSocketError(self.socket_path, f"path is {path_bytes} bytes, a unix socket path "
                                    f"holds at most {MAX_SOCKET_PATH}: shorten --device-plugin-dir "
                                    "or the resource name")
        try:
            if os.path.lexists(self.socket_path):
                os.unlink(self.socket_path)  # stale socket from an earlier run
        except OSError as e:
            raise PluginSocketError(self.socket_path, f"cannot remove the old socket: {e.strerror}") from e
        self.servicer.reset()
        server = grpc.aio.server()
        api_pb2_grpc.add_DevicePluginServicer_to_server(self.servicer, server)
        try:
            server.add_insecure_port(f"unix:{self.socket_path}")
        except RuntimeError as e:  # grpc says only "Failed to bind"; the directory is the usual cause
            missing = not os.path.isdir(os.path.dirname(self.socket_path))
            raise PluginSocketError(self.socket_path,
                                    "cannot bind: directory missing" if missing else "cannot bind") from e
        await server.start()
        self._server = server
        try:
            # Not via umask: it is process-wide and would also narrow files other threads create now.
            # Until the chmod the socket has the default 0755, which lets only root connect anyway.
            os.chmod(self.socket_path, 0o600)
            self.inode = os.stat(self.socket_path).st_ino
        except FileNotFoundError:
            self.inode = None

    def socket_intact(self) -> bool:
        try:
            return os.stat(self.socket_path).st_ino == self.inode
        except FileNotFoundError:
            return False

    async def stop(self, grace: float = 1.0, remove_socket: bool = True) -> None:
        self.servicer.stop_streams()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if remove_socket and self.inode is not None and self.socket_intact():
            os.unlink(self.socket_path)
        self.inode = None
