"""The peer tier: the real community SR-IOV device plugin and our agent on one simulated DGX Spark.

Every node gets its own tmpfs root, network namespace and kubelet stand-in; processes, the
namespace and the tree are removed when the test ends, pass or fail (the plugin's bind mounts
live in its own mount namespace and go with the process).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent._pb.deviceplugin.v1beta1 import api_pb2
from agent.sim.kubelet import FakeKubelet
from agent.sim.peer import PeerNode, PluginProcess, peer_binary, peer_node

REPO_ROOT = Path(__file__).resolve().parents[2]
RESOURCE = "nvidia.com/cx7_qsfp"
SOCKET = "nvidia.com_cx7_qsfp.sock"

# The deliberate differences from the peer: key -> what differs. docs/parity.md has one line per key
# (what, why ours is right, the upstream source); the tests check each is still observed.
DELIBERATE = {
    "preferred-allocation": "ours offers GetPreferredAllocation (options answered and registered)",
    "info-rdma-dev": "ours adds rdma.rdma_dev to each device of the _INFO env",
    "kubelet-absent": "with no kubelet.sock at start, ours waits for it; the peer exits",
    "devinfo-kept-on-exit": "on SIGTERM ours keeps the device-info files; the peer removes them",
    "vfio-dev-mount": "ours names the VF's group node (dev-mount) in its vfio _INFO object from the "
                      "first Allocate on; the peer's binary only from that VF's second Allocate",
}


class RecordingKubelet(FakeKubelet):
    """The kubelet stand-in, also keeping every RegisterRequest as it arrived (accepted or not)."""

    def __init__(self, plugin_dir: str) -> None:
        super().__init__(plugin_dir, before_register=self._record)
        self.requests: list[api_pb2.RegisterRequest] = []

    async def _record(self, request: api_pb2.RegisterRequest) -> str:
        copy = api_pb2.RegisterRequest()
        copy.CopyFrom(request)
        self.requests.append(copy)
        return ""

    def listed(self, after: int = 0, resource: str = RESOURCE) -> bool:
        """More than ``after`` registrations, and the newest endpoint has sent its device list."""
        ep = self.endpoints.get(resource)
        return len(self.registrations) > after and ep is not None and bool(ep.updates)


def kubelet_for(node: PeerNode) -> RecordingKubelet:
    return RecordingKubelet(node.settings.device_plugin_dir)


def _problem(binary: Path) -> str:
    if not binary.is_file():
        return f"community device plugin binary not found at {binary} (set SRIOV_PEER_BINARY)"
    if os.geteuid() != 0:
        return "needs root for network and mount namespaces"
    missing = [t for t in ("ip", "unshare") if shutil.which(t) is None]
    return f"needs {', '.join(missing)}" if missing else ""


@pytest.fixture(scope="session")
def binary() -> Path:
    path = peer_binary(REPO_ROOT)
    problem = _problem(path)
    if problem:
        pytest.skip(problem)
    return path


@pytest.fixture
def node(binary: Path) -> Iterator[PeerNode]:
    with peer_node(binary) as n:
        yield n


@contextlib.asynccontextmanager
async def running(proc: PluginProcess) -> AsyncIterator[PluginProcess]:
    """Start ``proc``; on the way out kill it if the test has not stopped it itself."""
    await proc.start()
    try:
        yield proc
    finally:
        await proc.kill()


@contextlib.asynccontextmanager
async def serving(kubelet: RecordingKubelet, start: bool = True) -> AsyncIterator[RecordingKubelet]:
    if start:
        await kubelet.start()
    try:
        yield kubelet
    finally:
        await kubelet.stop()


async def wait_listed(kubelet: RecordingKubelet, proc: PluginProcess, after: int = 0,
                      timeout: float = 20.0, resource: str = RESOURCE) -> None:
    """Until the plugin has registered more than ``after`` times and sent its devices; on timeout
    the failure carries the plugin's log."""
    try:
        await kubelet.wait_for(lambda: kubelet.listed(after, resource), timeout=timeout)
    except TimeoutError:
        state = "running" if proc.returncode is None else f"exited {proc.returncode}"
        raise AssertionError(f"{proc.name} did not register within {timeout} s ({state}); "
                             f"log tail:\n{proc.log()[-3000:]}") from None


@dataclass
class Observed:
    """What one plugin made the kubelet and the device-info directory see."""

    requests: list[api_pb2.RegisterRequest]
    options: api_pb2.DevicePluginOptions
    devices: list[tuple[str, str, tuple[int, ...]]]  # (ID, health, NUMA nodes) in the order sent
    devinfo_at_start: dict[str, tuple[str, str]]
    allocations: list[api_pb2.ContainerAllocateResponse]
    devinfo_after_allocate: dict[str, tuple[str, str]]
    exit_code: int
    devinfo_after_exit: dict[str, tuple[str, str]]
    sockets_after_exit: list[str]
    log: str


def allocation_requests(vfs: list[str]) -> list[list[str]]:
    """One VF; then two VFs in reverse order."""
    return [[vfs[0]], [vfs[3], vfs[1]]]


@dataclass
class Parity:
    """The same run, once with the community plugin (``peer``) and once with ours."""

    peer: Observed
    ours: Observed
    vfs: list[str]

    @property
    def requests(self) -> list[list[str]]:
        return allocation_requests(self.vfs)


async def observe(node: PeerNode, kubelet: RecordingKubelet, proc: PluginProcess,
                  resource: str = RESOURCE) -> Observed:
    """Start ``proc``, let it register and list, make the two Allocate calls, SIGTERM it; record it all."""
    node.clear_devinfo()
    before_reg, before_req = len(kubelet.registrations), len(kubelet.requests)
    async with running(proc):
        await wait_listed(kubelet, proc, before_reg, resource=resource)
        ep = kubelet.endpoints[resource]
        devices = [(d.id, d.health, d.numa) for d in ep.devices.values()]
        at_start = node.devinfo()
        allocations = [await kubelet.allocate(resource, ids) for ids in allocation_requests(node.vfs())]
        after_allocate = node.devinfo()
        # The peer notices SIGTERM only between two 5 s polls of its socket: allow for that.
        code = await proc.terminate(timeout=30)
        await kubelet.await_disconnects()
    return Observed(kubelet.requests[before_req:], ep.options, devices, at_start, allocations,
                    after_allocate, code, node.devinfo(), node.sockets(), proc.log())


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """For file-system conditions nothing notifies us of: re-check every 20 ms, bounded."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{what} within {timeout} s") from None
