"""Registration with the kubelet and surviving its restarts.

The kubelet deletes every socket in the device-plugin directory when it starts, then creates a
new kubelet.sock. We watch the directory with inotify: our socket vanishing means "serve again",
kubelet.sock appearing means "register again". No polling loop; a capped backoff only covers a
kubelet that is not up yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

import grpc

from agent._pb.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from agent.adapters.deviceplugin import DevicePluginServer
from agent.adapters.inotify import IN_CREATE, IN_DELETE, IN_MOVED_FROM, IN_MOVED_TO, Inotify
from agent.errors import KubeletRegistrationError
from agent.logs import ctx
from agent.settings import KUBELET_SOCKET_NAME

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"


async def register(kubelet_socket: str, endpoint: str, resource_name: str, timeout: float = 5.0) -> None:
    """One Register call. The kubelet dials us back before answering, so we must already serve."""
    # grpc-core uses the %-encoded socket path as :authority unless told otherwise (k8s PR #112597).
    options = [("grpc.default_authority", "localhost")]
    try:
        async with grpc.aio.insecure_channel(f"unix:{kubelet_socket}", options=options) as channel:
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
        raise KubeletRegistrationError(kubelet_socket, f"{e.code().name}: {e.details()}") from e


class PluginLifecycle:
    """Serve one resource's socket and keep it registered across kubelet restarts."""

    def __init__(self, plugin_dir: str, resource_name: str, server: DevicePluginServer,
                 on_registered: Callable[[bool], None] | None = None,
                 max_backoff: float = 5.0) -> None:
        self.plugin_dir = plugin_dir
        self.resource_name = resource_name
        self.server = server
        self.kubelet_socket = os.path.join(plugin_dir, KUBELET_SOCKET_NAME)
        self.endpoint = os.path.basename(server.socket_path)
        self.on_registered = on_registered
        self.max_backoff = max_backoff
        self.registered = False
        self.registrations = 0
        self._wake = asyncio.Event()
        self._kubelet_created = False
        self._own_deleted = False
        self._watching = asyncio.Event()

    def _set_registered(self, value: bool) -> None:
        self.registered = value
        if self.on_registered:
            self.on_registered(value)

    async def run(self) -> None:
        os.makedirs(self.plugin_dir, exist_ok=True)
        watcher = asyncio.create_task(self._watch_dir(), name=f"watch-{self.resource_name}")
        self._watching = asyncio.Event()
        try:
            await self._watching.wait()  # watch before serving, so no deletion slips by
            while True:
                await self.server.start()
                log.info("serving on %s", self.server.socket_path,
                         extra=ctx("serve", self.server.socket_path, resource=self.resource_name))
                await self._register_until_done()
                # Registered (or our socket vanished): wait for the kubelet to restart.
                while not (self._own_deleted or self._kubelet_created):
                    self._wake.clear()
                    await self._wake.wait()
                log.info("kubelet restarted (%s); serving and registering again",
                         "socket deleted" if self._own_deleted else "kubelet.sock recreated",
                         extra=ctx("kubelet-restart", self.kubelet_socket, resource=self.resource_name))
                self._set_registered(False)
                await self.server.stop(grace=0.2, remove_socket=not self._own_deleted)
                self._own_deleted = False
                self._kubelet_created = False
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self._set_registered(False)
            await self.server.stop(grace=0.5)

    async def _register_until_done(self) -> None:
        delay = 0.1
        last_error = ""
        while not self._own_deleted:
            self._kubelet_created = False
            try:
                await register(self.kubelet_socket, self.endpoint, self.resource_name)
            except KubeletRegistrationError as e:
                if e.reason != last_error:
                    log.warning("kubelet not ready, will retry: %s", e.reason,
                                extra=ctx("register", self.kubelet_socket, resource=self.resource_name))
                    last_error = e.reason
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            self.registrations += 1
            self._set_registered(True)
            log.info("registered with kubelet", extra=ctx("register", self.endpoint, resource=self.resource_name))
            return

    async def _watch_dir(self) -> None:
        ino = Inotify()
        try:
            ino.watch(self.plugin_dir, IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_MOVED_FROM)
            self._watching.set()
            async for ev in ino.events():
                if ev.name == KUBELET_SOCKET_NAME and ev.mask & (IN_CREATE | IN_MOVED_TO):
                    self._kubelet_created = True
                    self._wake.set()
                elif ev.name == self.endpoint and ev.mask & (IN_DELETE | IN_MOVED_FROM):
                    if not self.server.socket_intact() and self.server.inode is not None:
                        self._own_deleted = True
                        self._wake.set()
        finally:
            ino.close()
