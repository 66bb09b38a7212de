"""grpc.health.v1 on a TCP port (for the kubelet's native grpc probe) plus the `status` RPC.

Services: "" (overall) and one per component. A component is SERVING only while it really works
(registered with the kubelet, last reconcile succeeded, watchers running); "" is SERVING only when
every component is. All start NOT_SERVING. On SIGTERM everything turns NOT_SERVING for good
before the agent stops serving anything else.

The status RPC is one unary method whose request and response are JSON bytes (a generic handler:
no proto to keep in sync for a debugging aid).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.errors import AgentError, ListenError
from agent.logs import ctx
from agent.settings import split_address

log = logging.getLogger(__name__)

OVERALL = ""
DEVICEPLUGIN = "deviceplugin"
LIFECYCLE = "lifecycle"
MONITOR = "monitor"
COMPONENTS = (DEVICEPLUGIN, LIFECYCLE, MONITOR)
STATUS_SERVICE = "sriov_rdma_agent.v1.Status"
STATUS_METHOD = f"/{STATUS_SERVICE}/Get"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

StatusFn = Callable[[], Awaitable[Mapping[str, Any]]]


class StatusUnavailableError(AgentError):
    """`status` could not get an answer from the agent at the given address."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"agent status at {address}: {reason}")


class HealthServer:
    """One grpc.aio server: grpc.health.v1 for every component, and the status method."""

    def __init__(self, address: str, status: StatusFn | None = None) -> None:
        self.host, self.port = split_address(address, "--health-address")
        self.servicer = health.aio.HealthServicer()
        self.status_fn = status
        self.components: dict[str, tuple[bool, str]] = {c: (False, "starting") for c in COMPONENTS}
        self.shutting_down = False
        self._server: grpc.aio.Server | None = None
        self._push_lock = asyncio.Lock()
        self._pushes: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Serve; returns the bound port. Every service starts NOT_SERVING."""
        await self._push()
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        if self.status_fn is not None:
            server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(STATUS_SERVICE, {
                "Get": grpc.unary_unary_rpc_method_handler(self._status),
            })])
        host = f"[{self.host}]" if ":" in self.host else self.host
        try:
            self.port = server.add_insecure_port(f"{host}:{self.port}")
        except RuntimeError as e:  # grpc reports a failed bind (EADDRINUSE, EADDRNOTAVAIL) this way
            raise ListenError("--health-address", f"{self.host}:{self.port}",
                              "bind failed (address in use, or not an address of this host)") from e
        await server.start()
        self._server = server
        log.info("grpc health on %s:%d", self.host, self.port, extra=ctx("serve-health"))
        return self.port

    def report(self, component: str, ok: bool, reason: str = "") -> None:
        """Record a component's state (callable from sync callbacks); the servicer follows at once."""
        if component not in self.components:
            raise ValueError(f"unknown health component {component!r}")
        if self.components[component] == (ok, reason):
            return
        before = self.components[component][0]
        self.components[component] = (ok, reason)
        if self.shutting_down:
            return  # everything is NOT_SERVING for good; parts stopping now is the shutdown itself
        if before != ok:
            log.log(logging.INFO if ok else logging.WARNING, "health %s -> %s%s", component,
                    "SERVING" if ok else "NOT_SERVING", f" ({reason})" if reason else "",
                    extra=ctx("health-report", component, reason=reason or None))
        task = asyncio.get_running_loop().create_task(self._push())
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

    def overall_ok(self) -> bool:
        return all(ok for ok, _ in self.components.values())

    async def _push(self) -> None:
        async with self._push_lock:
            for c, (ok, _) in self.components.items():
                await self.servicer.set(c, SERVING if ok else NOT_SERVING)
            await self.servicer.set(OVERALL, SERVING if self.overall_ok() else NOT_SERVING)

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on; later reports are ignored by the servicer."""
        self.shutting_down = True
        async with self._push_lock:
            await self.servicer.enter_graceful_shutdown()
        log.info("health: graceful shutdown, all services NOT_SERVING", extra=ctx("shutdown"))

    async def stop(self, grace: float = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def _status(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        assert self.status_fn is not None
        doc = dict(await self.status_fn())
        doc["health"] = {c: {"serving": ok, "reason": r} for c, (ok, r) in self.components.items()}
        doc["health"]["overall"] = {"serving": self.overall_ok() and not self.shutting_down,
                                               "reason": "shutting down" if self.shutting_down else ""}
        return json.dumps(doc).encode()


async def fetch_status(address: str, timeout: float = 5.0) -> dict[str, Any]:
    """What `sriov-rdma-agent status` asks the running agent (at its --health-address)."""
    host, port = split_address(address, "--address")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"  # the agent listens everywhere; ask it locally
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    async with grpc.aio.insecure_channel(target) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(STATUS_METHOD)
        try:
            raw = await call(b"{}", timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise StatusUnavailableError(address, f"{e.code().name}: {e.details()}") from e
    doc: dict[str, Any] = json.loads(raw)
    return doc
