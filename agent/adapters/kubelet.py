"""Registration with the kubelet and surviving its restarts.

The kubelet deletes every socket in the device-plugin directory when it starts, then creates a
new kubelet.sock. We watch the directory with inotify: our socket vanishing means "serve again",
a kubelet.sock with a new inode means "register again". No polling loop; a capped backoff only
covers a kubelet that is not up yet, and any event in the directory cuts it short.

Five details make that prompt in every ordering, and exactly one Register per kubelet.sock:

* the wake-up event is cleared when an attempt starts, never when the wait after it starts, so
  an event that arrives while a Register is in flight ends that wait at once;
* the Go kubelet's ``net.Listen`` binds kubelet.sock (IN_CREATE) before it listens, and no event
  marks the listen(): a refused connect on a kubelet.sock that appeared under ``LISTEN_GRACE_S``
  ago is retried every ``LISTEN_RETRY_S``, a bounded retry that the IN_CREATE starts;
* every attempt dials afresh (``_CHANNEL_OPTIONS``): no subchannel shared with another
  channel can still be backing off from a refusal;
* the kubelet.sock we registered with is the one in place once Register has succeeded (read
  after the call, not before: one that appeared during the call is the kubelet that answered);
* a kubelet starting as we serve (node boot) can wipe our socket after we checked it. It wipes
  before it listens, so once we are connected to it a wipe has happened already: we connect first,
  check our socket, and only then send Register (none is sent for a socket that is gone). Should a
  wipe still land with Register in flight, the kubelet dials that deleted socket; our socket
  vanishing then means "serve again now", so the kubelet's dial finds us and that one Register
  completes. Our Register waits longer than the kubelet's 10 s dial (``REGISTER_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from agent._pb.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from agent.adapters.deviceplugin import DevicePluginServer
from agent.adapters.inotify import IN_CREATE, IN_DELETE, IN_MOVED_FROM, IN_MOVED_TO, IN_Q_OVERFLOW, Inotify
from agent.errors import KubeletRegistrationError, PluginSocketError, PluginSocketWipedError
from agent.logs import ctx
from agent.settings import KUBELET_SOCKET_NAME

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
LISTEN_GRACE_S = 2.0  # a kubelet.sock this new that refuses connections is bound, not yet listening
LISTEN_RETRY_S = 0.01  # retry cadence inside that window (at most 200 connects per kubelet.sock)
REGISTER_TIMEOUT_S = 15.0  # above the kubelet's 10 s dial of our socket (devicemanager handler.go)

# grpc-core shares subchannels between channels with the same target and arguments: a connect
# refused a moment ago leaves the shared subchannel in reconnect backoff (1 s, then 1.6x), and a new
# channel fails fast until that expires. A pool per channel makes every attempt a fresh connect().
_CHANNEL_OPTIONS = [
    ("grpc.default_authority", "localhost"),  # not the %-encoded socket path (k8s PR #112597)
    ("grpc.use_local_subchannel_pool", 1),
]


async def _connected(channel: grpc.aio.Channel, timeout: float) -> bool:
    """Connect now: True once READY, False at the first failure (the RPC then fails fast with
    grpc's own reason, and the caller's retry logic applies as for any refused connect)."""
    ready, failed = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE
    state = channel.get_state(try_to_connect=True)
    async with asyncio.timeout(timeout):
        while state not in (ready, failed):
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)
    return state is ready


async def register(kubelet_socket: str, endpoint: str, resource_name: str,
                   timeout: float = REGISTER_TIMEOUT_S,
                   still_serving: Callable[[], bool] | None = None) -> None:
    """One Register call. The kubelet dials us back before answering, so we must already serve.

    With ``still_serving``, the connection comes first and Register is sent only while it says
    yes; otherwise PluginSocketWipedError, and the kubelet has seen nothing."""
    try:
        async with grpc.aio.insecure_channel(f"unix:{kubelet_socket}", options=_CHANNEL_OPTIONS) as channel:
            if still_serving is not None and await _connected(channel, timeout) and not still_serving():
                raise PluginSocketWipedError(endpoint)
            stub = api_pb2_grpc.RegistrationStub(channel)
            await stub.Register(
                api_pb2.RegisterRequest(
                    version=API_VERSION,
                    endpoint=endpoint,
                    resource_name=resource_name,
                    options=api_pb2.DevicePluginOptions(get_preferred_allocation_available=True),
                ),
                timeout=timeout,
            )
    except grpc.aio.AioRpcError as e:
        raise KubeletRegistrationError(kubelet_socket, f"{e.code().name}: {e.details()}",
                                       unreachable=e.code() is grpc.StatusCode.UNAVAILABLE) from e


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


@dataclass
class _Backoff:
    """Capped doubling delay (0.1 s up) that reports each distinct failure reason once, not per retry."""

    max_delay: float
    delay: float = 0.1
    last_reason: str = ""

    def first_time(self, reason: str) -> bool:
        new = reason != self.last_reason
        self.last_reason = reason
        return new

    def next_delay(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self.max_delay)
        return delay


class PluginLifecycle:
    """Serve one resource's socket and keep it registered across kubelet restarts."""

    def __init__(self, plugin_dir: str, resource_name: str, server: DevicePluginServer,
                 on_registered: Callable[[bool], None] | None = None,
                 max_backoff: float = 5.0, *, before_register: Callable[[], None] | None = None) -> None:
        self.plugin_dir = plugin_dir
        self.resource_name = resource_name
        self.server = server
        self.kubelet_socket = os.path.join(plugin_dir, KUBELET_SOCKET_NAME)
        self.endpoint = os.path.basename(server.socket_path)
        self.on_registered = on_registered
        self.before_register = before_register  # once per registration: first, and per kubelet restart
        self.max_backoff = max_backoff
        self.registered = False
        self.registrations = 0
        self.attempts = 0  # Register calls made, failed ones included
        self._kubelet_inode: int | None = None  # kubelet.sock we last registered with
        self._appeared: tuple[int, float] | None = None  # newest kubelet.sock seen created, and when
        self._wake = asyncio.Event()  # set by directory events; cleared as an attempt or check starts

    def _set_registered(self, value: bool) -> None:
        self.registered = value
        if self.on_registered:
            self.on_registered(value)

    def _kubelet_restarted(self) -> bool:
        current = _inode(self.kubelet_socket)
        return current is not None and current != self._kubelet_inode

    async def run(self) -> None:
        os.makedirs(self.plugin_dir, exist_ok=True)
        watching = asyncio.Event()
        watcher = asyncio.create_task(self._watch_dir(watching), name=f"watch-{self.resource_name}")
        try:
            # Watch before serving, so no deletion between the two slips by.
            await asyncio.wait({watcher, asyncio.ensure_future(watching.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if watcher.done():
                watcher.result()  # the watch could not be set up: surface why
            while True:
                if not self.server.socket_intact():
                    await self._serve_until_done()
                if self.before_register:
                    self.before_register()
                if not await self._register_until_done():
                    continue  # our socket vanished while we were trying: serve again first
                await self._wait_for_kubelet_restart()
                if self.registered:
                    self._set_registered(False)
                log.info("kubelet restarted (%s); registering again",
                         "our socket was deleted" if not self.server.socket_intact() else "new kubelet.sock",
                         extra=ctx("kubelet-restart", self.kubelet_socket, resource=self.resource_name))
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if self.registered:
                self._set_registered(False)
            await self.server.stop(grace=0.5)

    async def _wait_for_kubelet_restart(self) -> None:
        """Sleep until our socket is deleted or a new kubelet.sock appears.

        A kubelet that stops removes kubelet.sock: we are no longer registered (the health endpoint
        says so) but keep serving, and register again as soon as the socket comes back.
        """
        while True:
            self._wake.clear()  # before the checks, so an event arriving during them is not lost
            if not self.server.socket_intact() or self._kubelet_restarted():
                return
            if self.registered and _inode(self.kubelet_socket) is None:
                self._set_registered(False)
                log.warning("kubelet.sock is gone: the kubelet stopped; waiting for it to come back",
                            extra=ctx("kubelet-stop", self.kubelet_socket, resource=self.resource_name))
            await self._wake.wait()

    async def _serve_until_done(self) -> None:
        """(Re)start the gRPC server, retrying with capped backoff. A socket we cannot create is
        logged once per distinct reason and retried, never fatal: the other resources keep serving."""
        backoff = _Backoff(self.max_backoff)
        while True:
            self._wake.clear()
            await self.server.stop(grace=0.2, remove_socket=False)
            try:
                await self.server.start()
            except PluginSocketError as e:
                if backoff.first_time(e.reason):
                    log.error("cannot serve, will retry: %s", e.reason,
                              extra=ctx("serve", e.socket, resource=self.resource_name))
                await self._sleep_unless_woken(backoff.next_delay())
                continue
            log.info("serving on %s", self.server.socket_path,
                     extra=ctx("serve", self.server.socket_path, resource=self.resource_name))
            return

    async def _sleep_unless_woken(self, delay: float) -> None:
        """Back off, but not past an event seen since the attempt began (the event is cleared
        when an attempt starts, so one that arrived while it was in flight ends this at once)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()

    def _listen_pending(self) -> bool:
        """kubelet.sock appeared moments ago: a refusal means bound but not listening yet."""
        seen = self._appeared
        return (seen is not None and seen[0] == _inode(self.kubelet_socket)
                and time.monotonic() - seen[1] < LISTEN_GRACE_S)

    async def _register_until_done(self) -> bool:
        """Register, retrying with capped backoff; False if our socket vanished meanwhile."""
        backoff = _Backoff(self.max_backoff)
        while True:
            self._wake.clear()
            if not self.server.socket_intact():
                return False
            self.attempts += 1
            try:
                await self._register_serving()
            except PluginSocketWipedError:
                log.info("our socket was wiped just before Register (a kubelet starting); serving again",
                         extra=ctx("register", self.server.socket_path, resource=self.resource_name))
                return False
            except KubeletRegistrationError as e:
                if backoff.first_time(e.reason):
                    log.warning("kubelet not ready, will retry: %s", e.reason,
                                extra=ctx("register", self.kubelet_socket, resource=self.resource_name))
                fast = e.unreachable and self._listen_pending()
                await self._sleep_unless_woken(LISTEN_RETRY_S if fast else backoff.next_delay())
                continue
            # Read after the call: a kubelet.sock that appeared during it belongs to the kubelet that
            # answered. Were it a newer kubelet than that, its start wiped our socket: we serve and
            # register again for that reason.
            self._kubelet_inode = _inode(self.kubelet_socket)
            self.registrations += 1
            self._set_registered(True)
            log.info("registered with kubelet",
                     extra=ctx("register", self.endpoint, resource=self.resource_name))
            return True

    async def _register_serving(self) -> None:
        """One Register; our socket deleted while it is in flight is served again at once (the
        kubelet that answers may be dialling it). Events seen meanwhile stay set for the caller."""
        call = asyncio.ensure_future(register(self.kubelet_socket, self.endpoint, self.resource_name,
                                              still_serving=self.server.socket_intact))
        woken = False
        try:
            while not call.done():
                waker = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({call, waker}, return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                if call.done() or not self._wake.is_set():
                    continue
                woken = True
                self._wake.clear()
                if not self.server.socket_intact():
                    log.info("our socket was deleted while registering: serving again for the kubelet's dial",
                             extra=ctx("serve", self.server.socket_path, resource=self.resource_name))
                    await self._serve_until_done()
            call.result()
        finally:
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, KubeletRegistrationError,
                                         PluginSocketWipedError):
                    await call
            if woken:
                self._wake.set()

    def _kubelet_sock_appeared(self) -> None:
        inode = _inode(self.kubelet_socket)
        if inode is not None:
            self._appeared = (inode, time.monotonic())

    async def _watch_dir(self, watching: asyncio.Event) -> None:
        ino = Inotify()
        try:
            ino.watch(self.plugin_dir, IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_MOVED_FROM)
            watching.set()
            async for ev in ino.events():
                if ev.mask & IN_Q_OVERFLOW:
                    # Events were lost: the loop re-checks both sockets, and a kubelet.sock we have
                    # not registered with may have just been created.
                    log.warning("inotify queue overflowed; re-checking the sockets",
                                extra=ctx("watch", self.plugin_dir, resource=self.resource_name))
                    known = {self._kubelet_inode, self._appeared[0] if self._appeared else None}
                    if _inode(self.kubelet_socket) not in known:
                        self._kubelet_sock_appeared()
                    self._wake.set()
                elif ev.name == KUBELET_SOCKET_NAME:
                    if ev.mask & (IN_CREATE | IN_MOVED_TO):
                        self._kubelet_sock_appeared()
                    self._wake.set()
                elif ev.name == self.endpoint:
                    self._wake.set()
        finally:
            ino.close()
