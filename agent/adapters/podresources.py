"""Which devices running pods hold: the kubelet PodResources API v1 ``List`` (read-only, unix socket).

The kubelet serves it at /var/lib/kubelet/pod-resources/kubelet.sock. Mount the directory, not the
socket: the kubelet recreates the socket (new inode) when it restarts, so every call dials afresh.
When the API cannot be asked, callers fall back to the agent's own Allocate record.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import grpc

from agent._pb.podresources.v1 import api_pb2, api_pb2_grpc
from agent.core.status import PodDirectory, PodRef
from agent.errors import AgentError


class PodResourcesUnavailableError(AgentError):
    """The PodResources API could not be asked (no socket, kubelet down, timeout)."""

    def __init__(self, socket: str, reason: str) -> None:
        self.socket = socket
        self.reason = reason
        super().__init__(f"PodResources at {socket}: {reason}")


class PodResourcesClient:
    """A PodDirectory backed by the kubelet: (resource, device ID) -> the container holding it."""

    def __init__(self, socket: str, timeout: float = 3.0) -> None:
        self.socket = socket
        self.timeout = timeout

    async def device_owners(self) -> dict[tuple[str, str], PodRef]:
        if not os.path.exists(self.socket):
            mounted = os.path.isdir(os.path.dirname(self.socket))
            raise PodResourcesUnavailableError(self.socket, "no socket (is the kubelet running?)" if mounted
                                               else "no socket (is the pod-resources dir mounted?)")
        # A channel of its own subchannel pool: a kubelet that refused a moment ago (restarting) is
        # dialled afresh, not after grpc-core's shared reconnect backoff of up to a second.
        channel = grpc.aio.insecure_channel(f"unix:{self.socket}",
                                            options=[("grpc.default_authority", "localhost"),
                                                     ("grpc.use_local_subchannel_pool", 1)])
        try:
            stub: api_pb2_grpc.PodResourcesListerAsyncStub = api_pb2_grpc.PodResourcesListerStub(channel)
            resp = await stub.List(api_pb2.ListPodResourcesRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            raise PodResourcesUnavailableError(self.socket, f"{e.code().name}: {e.details()}") from e
        finally:
            await channel.close()
        out: dict[tuple[str, str], PodRef] = {}
        for pod in resp.pod_resources:
            for c in pod.containers:
                for dev in c.devices:
                    for dev_id in dev.device_ids:
                        out[(dev.resource_name, dev_id)] = PodRef(pod.namespace, pod.name, c.name)
        return out


Owners = dict[tuple[str, str], PodRef]


class CachedPodDirectory:
    """At most one PodResources List per ``max_age`` seconds, shared by concurrent callers.

    `status` calls and metric scrapes go through this, so a burst of them is one call to the
    kubelet, not one each. A failure is remembered as long as an answer would be. The VF lifecycle
    does not use it: deciding whether a VF is free needs the kubelet's word of now.
    """

    def __init__(self, pods: PodDirectory, max_age: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pods = pods
        self.max_age = max_age
        self.clock = clock
        self.calls = 0  # List calls made on behalf of callers
        self._at: float | None = None
        self._result: Owners | AgentError = {}
        self._inflight: asyncio.Future[None] | None = None

    async def device_owners(self) -> Owners:
        if self._at is None or self.clock() - self._at >= self.max_age:
            if self._inflight is None:
                self._inflight = asyncio.ensure_future(self._fetch())
            await asyncio.shield(self._inflight)
        if isinstance(self._result, AgentError):
            raise self._result.with_traceback(None)  # a fresh traceback, not one grown per caller
        return self._result

    async def _fetch(self) -> None:
        self.calls += 1
        try:
            self._result = dict(await self.pods.device_owners())
        except AgentError as e:
            self._result = e
        finally:
            self._at = self.clock()
            self._inflight = None
