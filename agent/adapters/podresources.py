"""Which devices running pods hold: the kubelet PodResources API v1 ``List`` (read-only, unix socket).

The kubelet serves it at /var/lib/kubelet/pod-resources/kubelet.sock. Mount the directory, not the
socket: the kubelet recreates the socket (new inode) when it restarts, so every call dials afresh.
When the API cannot be asked, callers fall back to the agent's own Allocate record.
"""

from __future__ import annotations

import os

import grpc

from agent._pb.podresources.v1 import api_pb2, api_pb2_grpc
from agent.errors import AgentError
from agent.status import PodRef


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
            raise PodResourcesUnavailableError(self.socket, "no socket (is the pod-resources dir mounted?)")
        channel = grpc.aio.insecure_channel(f"unix:{self.socket}",
                                            options=[("grpc.default_authority", "localhost")])
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
