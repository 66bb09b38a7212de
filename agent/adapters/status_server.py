"""`sriov-rdma-agent status` over a unix socket the agent owns (mode 0600), never over the network.

The document names the namespace, pod and container behind every VF, so it is only for whoever
can already run commands in the agent's container (`kubectl exec ... status`); grpc.health.v1
stays on --health-address for the kubelet's probes. The method is one unary call whose request
and response are JSON bytes (a generic handler: no proto to keep in sync for a debugging aid).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc

from agent.adapters.deviceplugin import MAX_SOCKET_PATH
from agent.errors import AgentError, ListenError
from agent.logs import ctx

log = logging.getLogger(__name__)

STATUS_SERVICE = "sriov_rdma_agent.v1.Status"
STATUS_METHOD = f"/{STATUS_SERVICE}/Get"
FLAG = "--status-socket"

StatusFn = Callable[[], Awaitable[Mapping[str, Any]]]


class StatusUnavailableError(AgentError):
    """`status` could not get an answer from the agent at the given socket."""

    def __init__(self, socket: str, reason: str) -> None:
        self.socket = socket
        self.reason = reason
        super().__init__(f"agent status at {socket}: {reason}")


class StatusServer:
    """A grpc.aio server on ``socket_path`` answering the status method with ``status_fn()``."""

    def __init__(self, socket_path: str, status_fn: StatusFn) -> None:
        self.socket_path = socket_path
        self.status_fn = status_fn
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Serve. The directory is made (0700) if missing; a socket left by an earlier run is
        replaced, one that a live process still answers on is not."""
        path = self.socket_path
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise ListenError(FLAG, path, f"a unix socket path holds at most {MAX_SOCKET_PATH} bytes")
        if _answers(path):
            raise ListenError(FLAG, path, "another process serves on it")
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            if os.path.lexists(path):
                os.unlink(path)
        except OSError as e:
            raise ListenError(FLAG, path, e.strerror or str(e)) from e
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(STATUS_SERVICE, {
            "Get": grpc.unary_unary_rpc_method_handler(self._status),
        })])
        try:
            server.add_insecure_port(f"unix:{path}")
        except RuntimeError as e:
            raise ListenError(FLAG, path, "bind failed") from e
        await server.start()
        os.chmod(path, 0o600)
        self._server = server
        log.info("status on unix:%s", path, extra=ctx("serve-status", path))

    async def stop(self, grace: float = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    async def _status(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return json.dumps(await self.status_fn()).encode()


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


async def fetch_status(socket_path: str, timeout: float = 5.0) -> dict[str, Any]:
    """What `sriov-rdma-agent status` asks the running agent (at its --status-socket)."""
    if not os.path.exists(socket_path):
        raise StatusUnavailableError(socket_path, "no such socket (is the agent running here, with this "
                                     f"{FLAG}?)")
    options = [("grpc.default_authority", "localhost")]
    async with grpc.aio.insecure_channel(f"unix:{socket_path}", options=options) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(STATUS_METHOD)
        try:
            raw = await call(b"{}", timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise StatusUnavailableError(socket_path, f"{e.code().name}: {e.details()}") from e
    doc: dict[str, Any] = json.loads(raw)
    return doc
