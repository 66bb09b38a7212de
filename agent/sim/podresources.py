"""A kubelet PodResources v1 stand-in: ``List`` over a real unix socket, fed by the test or demo."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import grpc

from agent._pb.podresources.v1 import api_pb2, api_pb2_grpc


@dataclass(frozen=True)
class PodDevice:
    namespace: str
    pod: str
    container: str
    resource: str
    device_ids: tuple[str, ...]


class FakePodResources(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, socket: str) -> None:
        self.socket = socket
        self.pods: list[PodDevice] = []
        self.calls = 0
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.socket), exist_ok=True)
        server = grpc.aio.server()
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(self, server)
        server.add_insecure_port(f"unix:{self.socket}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)

    async def List(
        self, request: api_pb2.ListPodResourcesRequest,
        context: grpc.aio.ServicerContext[api_pb2.ListPodResourcesRequest, api_pb2.ListPodResourcesResponse],
    ) -> api_pb2.ListPodResourcesResponse:
        self.calls += 1
        return api_pb2.ListPodResourcesResponse(pod_resources=[
            api_pb2.PodResources(name=p.pod, namespace=p.namespace, containers=[
                api_pb2.ContainerResources(name=p.container, devices=[
                    api_pb2.ContainerDevices(resource_name=p.resource, device_ids=list(p.device_ids))])])
            for p in self.pods])
