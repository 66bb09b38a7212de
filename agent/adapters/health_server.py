"""grpc.health.v1 on a TCP port, for the kubelet's native grpc probes (and nothing else).

Services: "" (overall) and one per component. A component is SERVING only while it really works
(registered with the kubelet, last reconcile succeeded, watchers running); "" is SERVING only when
every component is. All start NOT_SERVING. On SIGTERM everything turns NOT_SERVING for good
before the agent stops serving anything else.

`status` is not served here: it names the pods behind every VF, so it lives on a unix socket
(adapters/status_server.py) and this port, open to the node's network, says only SERVING or not.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.errors import ListenError
from agent.logs import ctx
from agent.settings import split_address

log = logging.getLogger(__name__)

OVERALL = ""
DEVICEPLUGIN = "deviceplugin"
LIFECYCLE = "lifecycle"
MONITOR = "monitor"
COMPONENTS = (DEVICEPLUGIN, LIFECYCLE, MONITOR)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

class HealthServer:
    """One grpc.aio server: grpc.health.v1 for every component."""

    def __init__(self, address: str) -> None:
        self.host, self.port = split_address(address, "--health-address")
        self.servicer = health.aio.HealthServicer()
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

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every component and the overall state, for the status document."""
        doc: dict[str, dict[str, Any]] = {c: {"serving": ok, "reason": r}
                                          for c, (ok, r) in self.components.items()}
        doc["overall"] = {"serving": self.overall_ok() and not self.shutting_down,
                          "reason": "shutting down" if self.shutting_down else ""}
        return doc
