"""The least a Python device plugin on grpcio can be: a floor for bench_startup.py.

Imports grpc and the generated device-plugin code (plus the modules named in FLOOR_IMPORTS, to
price the other required dependencies), serves one socket, Registers, lists one Healthy device and
answers Allocate with a response the size of ours (the env pair and two device specs). Start-up as
the agent's entry point does it: collector off while importing, then frozen.

    python bench/floor_plugin.py <device-plugin-dir>
"""

import gc

gc.disable()

import asyncio  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402

import grpc  # noqa: E402

from agent._pb.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc  # noqa: E402

for _module in filter(None, os.environ.get("FLOOR_IMPORTS", "").split(",")):
    __import__(_module)
gc.freeze()
gc.enable()

RESOURCE = "nvidia.com/cx7_qsfp"
VF = "0002:01:00.2"
INFO = ('{"0002:01:00.2":{"generic":{"deviceID":"0002:01:00.2"},"rdma":{"rdma_cm":"/dev/infiniband/rdma_cm",'
        '"rdma_dev":"mlx5_4","uverbs":"/dev/infiniband/uverbs4"}}}')


class Floor(api_pb2_grpc.DevicePluginServicer):
    async def GetDevicePluginOptions(self, request: api_pb2.Empty,
                                     context: object) -> api_pb2.DevicePluginOptions:
        return api_pb2.DevicePluginOptions(get_preferred_allocation_available=True)

    async def ListAndWatch(self, request: api_pb2.Empty,
                           context: object) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
        yield api_pb2.ListAndWatchResponse(devices=[api_pb2.Device(ID=VF, health="Healthy")])
        await asyncio.Event().wait()

    async def Allocate(self, request: api_pb2.AllocateRequest, context: object) -> api_pb2.AllocateResponse:
        specs = [api_pb2.DeviceSpec(container_path=p, host_path=p, permissions="rw")
                 for p in ("/dev/infiniband/uverbs4", "/dev/infiniband/rdma_cm")]
        envs = {"PCIDEVICE_NVIDIA_COM_CX7_QSFP": VF, "PCIDEVICE_NVIDIA_COM_CX7_QSFP_INFO": INFO}
        return api_pb2.AllocateResponse(container_responses=[
            api_pb2.ContainerAllocateResponse(envs=envs, devices=specs) for _ in request.container_requests])

    async def GetPreferredAllocation(self, request: api_pb2.PreferredAllocationRequest,
                                     context: object) -> api_pb2.PreferredAllocationResponse:
        return api_pb2.PreferredAllocationResponse(container_responses=[
            api_pb2.ContainerPreferredAllocationResponse(deviceIDs=list(r.available_deviceIDs)[:r.allocation_size])
            for r in request.container_requests])

    async def PreStartContainer(self, request: api_pb2.PreStartContainerRequest,
                                context: object) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()


async def main(plugin_dir: str) -> None:
    server = grpc.aio.server()
    api_pb2_grpc.add_DevicePluginServicer_to_server(Floor(), server)
    server.add_insecure_port(f"unix:{plugin_dir}/floor.sock")
    await server.start()
    async with grpc.aio.insecure_channel(f"unix:{plugin_dir}/kubelet.sock",
                                         options=[("grpc.default_authority", "localhost")]) as channel:
        await api_pb2_grpc.RegistrationStub(channel).Register(api_pb2.RegisterRequest(
            version="v1beta1", endpoint="floor.sock", resource_name=RESOURCE,
            options=api_pb2.DevicePluginOptions(get_preferred_allocation_available=True)))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
