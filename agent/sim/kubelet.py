"""A kubelet stand-in that behaves like the real device manager, for the demo, tests and bench.

Modelled on kubelet pkg/kubelet/cm/devicemanager (manager.go, plugin/v1beta1/{server,client,
handler}.go):

* start: ``CleanupPluginDirectory`` removes every socket in the plugin directory except the
  checkpoint (directories and other files stay); then Go's ``net.Listen("unix")`` creates
  kubelet.sock: ``bind()`` (the file appears, inotify says IN_CREATE) and only then ``listen()``.
  In between, ``connect()`` is refused. ``listen_delay`` widens that window; ``bind()`` and
  ``listen()`` let a test place events inside it;
* the registration server's serve-retry (``serveWithRetry``) replaces kubelet.sock within one
  kubelet instance: ``relisten()``;
* Register: rejects a version other than v1beta1 and a resource name that is not an extended
  resource (``IsExtendedResourceName``), with the kubelet's own messages; then dials
  ``<dir>/<endpoint>`` (blocking, 10 s, authority "localhost"), calls GetDevicePluginOptions
  and only then answers; ListAndWatch runs in the background;
* a second Register for the same resource adds a second client and makes it the resource's
  endpoint; the first client stays connected. When a client's stream ends, ``runClient``
  disconnects the first client registered under that socket path and ``PluginDisconnected``
  marks the resource's *current* endpoint stopped with every device unhealthy: a plugin that
  registers twice has its live registration stopped when the older stream ends;
* every ListAndWatch message replaces the resource's device set (Healthy vs anything else);
* a stopped endpoint stays stopped (the kubelet drops it from capacity after a 5 min grace).

kubelet.sock itself is a plain socket this stand-in binds and listens on; each accepted
connection is relayed to a gRPC server on an abstract socket (grpc cannot be handed a bound
socket), one per kubelet.sock, so every Register is recorded with the kubelet.sock it came in on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import socket
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
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
_backend_ids = itertools.count()

# Awaited at the start of every Register; a non-empty string rejects it with that message.
RegisterHook = Callable[[api_pb2.RegisterRequest], Awaitable[str]]


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
    """One registered plugin client, as the kubelet's endpointInfo plus what tests look at."""

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


@dataclass(frozen=True)
class RegisterCall:
    """One Register RPC as it reached the kubelet, accepted (problem "") or not."""

    at: float  # time.monotonic() when it was answered
    resource: str
    endpoint: str
    instance: int  # which start() of the kubelet: one kubelet process
    socket_inode: int  # the kubelet.sock the connection came in on
    problem: str


@dataclass
class _Listener:
    """One kubelet.sock: the bound socket, its relay server once listening, and its gRPC backend."""

    instance: int
    inode: int
    sock: socket.socket
    relay: asyncio.Server | None = None
    backend: grpc.aio.Server | None = None
    conns: set[asyncio.StreamWriter] = field(default_factory=set)


class _RegistrationService(api_pb2_grpc.RegistrationServicer):
    """The Registration service behind one kubelet.sock (known once that socket listens)."""

    def __init__(self, kubelet: FakeKubelet) -> None:
        self.kubelet = kubelet
        self.listener: _Listener | None = None

    async def Register(
        self, request: api_pb2.RegisterRequest,
        context: grpc.aio.ServicerContext[api_pb2.RegisterRequest, api_pb2.Empty],
    ) -> api_pb2.Empty:
        assert self.listener is not None  # connections reach us only through a listening kubelet.sock
        return await self.kubelet.handle_register(request, context, self.listener)


class FakeKubelet:
    def __init__(self, plugin_dir: str, dial_timeout: float = 10.0, listen_delay: float = 0.0,
                 before_register: RegisterHook | None = None) -> None:
        self.plugin_dir = plugin_dir
        self.socket = os.path.join(plugin_dir, "kubelet.sock")
        self.dial_timeout = dial_timeout
        self.listen_delay = listen_delay  # seconds between bind() and listen() in start()
        self.before_register = before_register
        self.endpoints: dict[str, Endpoint] = {}  # the device manager's endpoint per resource
        self.registrations: list[tuple[float, str]] = []  # (time.monotonic(), resource) per success
        self.rejections: list[str] = []
        self.calls: list[RegisterCall] = []  # every Register, with the kubelet.sock it came in on
        self.instance = 0  # bumped by every start()/bind(): a new kubelet process
        self.socket_inode: int | None = None  # the current kubelet.sock
        self.bound_at: float | None = None  # the current kubelet.sock appeared (IN_CREATE)
        self.started_at: float | None = None  # ... and accepts connections (listen)
        self._clients: dict[str, list[Endpoint]] = {}  # handler.go's clients, per resource
        self._listeners: list[_Listener] = []
        self._backend: tuple[grpc.aio.Server, str, _RegistrationService] | None = None  # ready, unused
        self._changed = asyncio.Condition()

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """A kubelet process starting: clean the directory, bind kubelet.sock, listen on it."""
        await self._prepare_backend()  # first, so the bind -> listen window is listen_delay only
        self.bind()
        if self.listen_delay > 0:
            await asyncio.sleep(self.listen_delay)
        await self.listen()

    def bind(self) -> None:
        """A new kubelet instance up to the bind(): sockets wiped, kubelet.sock exists, refusing."""
        os.makedirs(self.plugin_dir, mode=0o750, exist_ok=True)
        self.cleanup_plugin_directory()
        self.instance += 1
        self._bind()

    def _bind(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.socket)
            inode = os.stat(self.socket).st_ino
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._listeners.append(_Listener(self.instance, inode, sock))
        self.socket_inode = inode
        self.bound_at = time.monotonic()
        self.started_at = None

    async def _prepare_backend(self) -> None:
        if self._backend is None:
            service = _RegistrationService(self)
            backend = grpc.aio.server()
            api_pb2_grpc.add_RegistrationServicer_to_server(service, backend)
            name = f"sra-kubelet-{os.getpid()}-{next(_backend_ids)}"
            backend.add_insecure_port(f"unix-abstract:{name}")
            await backend.start()
            self._backend = (backend, name, service)

    async def listen(self) -> None:
        """listen() on the bound kubelet.sock: from now on Register calls get through."""
        listener = self._listeners[-1]
        if listener.relay is not None:
            raise RuntimeError("kubelet.sock is already listening")
        await self._prepare_backend()
        assert self._backend is not None
        (backend, name, service), self._backend = self._backend, None
        service.listener = listener
        listener.backend = backend

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._relay(listener, name, reader, writer)

        # start_unix_server calls listen() on the socket it is given.
        listener.relay = await asyncio.start_unix_server(relay, sock=listener.sock)
        self.started_at = time.monotonic()

    async def relisten(self) -> None:
        """serveWithRetry in the same kubelet instance: kubelet.sock closed and removed, then a new
        one bound and listened on. Connections accepted on the old one stay open."""
        await self._prepare_backend()
        self._close_listening(self._listeners[-1])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        self._bind()
        if self.listen_delay > 0:
            await asyncio.sleep(self.listen_delay)
        await self.listen()

    @staticmethod
    def _close_listening(listener: _Listener) -> None:
        if listener.relay is not None:
            listener.relay.close()
        listener.sock.close()

    async def _relay(self, listener: _Listener, backend: str, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        listener.conns.add(writer)
        try:
            b_reader, b_writer = await asyncio.open_unix_connection("\0" + backend)
        except OSError:
            listener.conns.discard(writer)
            writer.close()
            return
        listener.conns.add(b_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pipe(reader, b_writer), pipe(b_reader, writer))
        finally:
            listener.conns.discard(writer)
            listener.conns.discard(b_writer)

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
        """Stop(): every client disconnected, the server stopped, kubelet.sock removed (Go's
        UnixListener.Close unlinks the path)."""
        for clients in list(self._clients.values()):
            for ep in list(clients):
                if ep.task is not None and ep.task is not asyncio.current_task():
                    ep.task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                        await ep.task
                await self._disconnect_client(ep)
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            self._close_listening(listener)
            for writer in list(listener.conns):
                writer.close()
            if listener.backend is not None:
                await listener.backend.stop(0)
        if self._backend is not None:
            await self._backend[0].stop(0)
            self._backend = None
        if listeners:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket)
        self.socket_inode = None
        self.started_at = None

    async def await_disconnects(self, timeout: float = 5.0) -> None:
        """Let open ListAndWatch readers see their streams end before stop() cancels them.

        A plugin that just shut down ended its streams, but the kubelet learns that asynchronously;
        cancelling first would skip the disconnect handling (devices marked Unhealthy). A stream still
        open after ``timeout`` is left for stop() to cut, so a plugin that never ends it is visible.
        """
        live = [ep.task for clients in self._clients.values() for ep in clients
                if ep.task is not None and not ep.task.done()]
        if live:
            await asyncio.wait(live, timeout=timeout)

    async def restart(self) -> None:
        """A kubelet restart: sockets deleted, new kubelet.sock, plugins must re-register."""
        await self.stop()
        self.endpoints.clear()
        await self.start()

    # ---------------------------------------------------------------- Registration service
    async def handle_register(
        self, request: api_pb2.RegisterRequest,
        context: grpc.aio.ServicerContext[api_pb2.RegisterRequest, api_pb2.Empty], listener: _Listener,
    ) -> api_pb2.Empty:
        problem = await self.before_register(request) if self.before_register else ""
        problem = problem or self._validate(request)
        if problem:
            await self._reject(context, listener, request, problem)
        sock = os.path.join(self.plugin_dir, request.endpoint)
        channel = grpc.aio.insecure_channel(f"unix:{sock}", options=[("grpc.default_authority", "localhost")])
        stub: api_pb2_grpc.DevicePluginAsyncStub = api_pb2_grpc.DevicePluginStub(channel)
        try:
            async with asyncio.timeout(self.dial_timeout):
                await channel.channel_ready()
        except TimeoutError:
            await channel.close()
            await self._reject(context, listener, request,
                               f"failed to dial device plugin: {sock}: context deadline exceeded")
        try:
            options = await stub.GetDevicePluginOptions(api_pb2.Empty())
        except grpc.aio.AioRpcError as e:
            await channel.close()
            await self._reject(context, listener, request,
                               f"failed to get device plugin options: {e.code().name}: {e.details()}")
        ep = Endpoint(request.resource_name, sock, options, channel, stub)
        self._clients.setdefault(ep.resource, []).append(ep)  # registerClient: the old one stays
        self.endpoints[ep.resource] = ep  # PluginConnected
        now = time.monotonic()
        self.registrations.append((now, ep.resource))
        self.calls.append(RegisterCall(now, ep.resource, request.endpoint, listener.instance, listener.inode,
                                       problem=""))
        ep.task = asyncio.create_task(self._run_client(ep))
        await self._notify()
        return api_pb2.Empty()

    async def _reject(self, context: grpc.aio.ServicerContext[api_pb2.RegisterRequest, api_pb2.Empty],
                      listener: _Listener, request: api_pb2.RegisterRequest, problem: str) -> NoReturn:
        self.rejections.append(problem)
        self.calls.append(RegisterCall(time.monotonic(), request.resource_name, request.endpoint,
                                       listener.instance, listener.inode, problem))
        await self._notify()
        await context.abort(grpc.StatusCode.UNKNOWN, problem)

    def _validate(self, req: api_pb2.RegisterRequest) -> str:
        if req.version not in SUPPORTED_VERSIONS:
            return (f"requested API version {json.dumps(req.version)} is not supported by kubelet. "
                    f"Supported version is {json.dumps(list(SUPPORTED_VERSIONS))}")
        if not is_extended_resource_name(req.resource_name):
            return f"the ResourceName {json.dumps(req.resource_name)} is invalid"
        return ""

    async def _run_client(self, ep: Endpoint) -> None:
        """client.Run then handler.runClient."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for resp in ep.stub.ListAndWatch(api_pb2.Empty()):
                # PluginListAndWatchReceiver: the message replaces the resource's device set.
                target = self.endpoints.get(ep.resource, ep)
                target.devices = {d.ID: SeenDevice(d.ID, HEALTHY if d.health == HEALTHY else UNHEALTHY,
                                                   tuple(n.ID for n in d.topology.nodes))
                                  for d in resp.devices}
                target.updates.append((time.monotonic(), target.devices))
                await self._notify()
        # runClient: the first client under this socket path, which need not be this one.
        first = next((c for c in self._clients.get(ep.resource, []) if c.socket == ep.socket), None)
        if first is not None:
            await self._disconnect_client(first)

    async def _disconnect_client(self, ep: Endpoint) -> None:
        """disconnectClient: deregister, close the connection, then PluginDisconnected, which marks
        the resource's current endpoint stopped and every device of it unhealthy."""
        clients = self._clients.get(ep.resource, [])
        if ep in clients:
            clients.remove(ep)
            if not clients:
                del self._clients[ep.resource]
        await ep.channel.close()
        current = self.endpoints.get(ep.resource)
        if current is not None:
            current.stopped_at = time.monotonic()
            current.devices = {k: SeenDevice(v.id, UNHEALTHY, v.numa) for k, v in current.devices.items()}
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ---------------------------------------------------------------- what tests ask
    def registers_per_instance(self, resource: str) -> Counter[int]:
        """Accepted Registers for ``resource`` per kubelet instance (a start() of the kubelet)."""
        return Counter(c.instance for c in self.calls if c.resource == resource and not c.problem)

    def clients(self, resource: str) -> list[Endpoint]:
        """The plugin clients the kubelet holds for ``resource`` (more than one: a double Register)."""
        return list(self._clients.get(resource, []))

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
