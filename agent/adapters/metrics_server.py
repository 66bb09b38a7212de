"""The metrics HTTP endpoint: a minimal HTTP/1.1 server on the agent's event loop, GET /metrics.

On the event loop, so the collector reads agent state on the thread that changes it (no locks, no
torn reads). It knows nothing of metrics: it asks a Scrape for the body when a request comes in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from agent.adapters.metrics_exposition import CONTENT_TYPE
from agent.errors import ListenError
from agent.logs import ctx
from agent.settings import split_address

log = logging.getLogger(__name__)


class Scrape(Protocol):
    async def render(self) -> bytes:
        """The exposition (CONTENT_TYPE) as of now."""
        ...


class MetricsServer:
    """GET or HEAD /metrics (or /), one request per connection."""

    MAX_HEADER = 16 * 1024

    def __init__(self, address: str, metrics: Scrape, read_timeout: float = 10.0) -> None:
        self.host, self.port = split_address(address, "--metrics-address")
        self.metrics = metrics
        self.read_timeout = read_timeout
        self._server: asyncio.Server | None = None
        self.scrapes = 0

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                      limit=self.MAX_HEADER, reuse_address=True)
        except OSError as e:
            raise ListenError("--metrics-address", f"{self.host}:{self.port}", e.strerror or str(e)) from e
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port, extra=ctx("serve-metrics"))
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
            method, path = _request_line(head)
            if method not in ("GET", "HEAD"):
                await _respond(writer, 405, b"only GET\n", "text/plain", extra="Allow: GET, HEAD\r\n")
            elif path.split("?", 1)[0] in ("/metrics", "/"):
                started = time.perf_counter()
                body = await self.metrics.render()
                self.scrapes += 1
                log.debug("scrape served in %.1f ms", (time.perf_counter() - started) * 1000,
                          extra=ctx("scrape"))
                await _respond(writer, 200, b"" if method == "HEAD" else body, CONTENT_TYPE,
                               length=len(body))
            else:
                await _respond(writer, 404, b"metrics are at /metrics\n", "text/plain")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            with contextlib.suppress(ConnectionError):
                await _respond(writer, 400, b"bad request\n", "text/plain")
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _request_line(head: bytes) -> tuple[str, str]:
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("malformed request line")
    return parts[0], parts[1]


async def _respond(writer: asyncio.StreamWriter, code: int, body: bytes, ctype: str, *,
                   length: int | None = None, extra: str = "") -> None:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}[code]
    head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n{extra}\r\n")
    writer.write(head.encode("latin-1") + body)
    await writer.drain()
