"""The device-plugin gRPC handlers with generated requests, over the real unix socket of a running
agent: every answer is OK or INVALID_ARGUMENT, a refused Allocate leaves no device-info file and no
recorded allocation behind, and a preferred allocation is always drawn from what was offered."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent._pb.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from agent.app import App, build_agent
from agent.config import parse_config
from agent.settings import Settings
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import dgx_spark
from tests.conftest import CX7_CONFIG, RESOURCE, node_settings

VFS = ["0002:01:00.2", "0002:01:00.3", "0002:01:00.4", "0002:01:00.5"]
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


@dataclass
class Running:
    agent: App
    settings: Settings
    stub: api_pb2_grpc.DevicePluginStub

    def devinfo(self) -> set[str]:
        d = Path(self.settings.devinfo_dir)
        return set(os.listdir(d)) if d.exists() else set()


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    """The agent and the kubelet stand-in on their own event loop in a thread, for the whole module."""
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    base = Path(tempfile.mkdtemp(prefix="sra-fz-", dir=shm))
    node = dgx_spark(base / "node")
    settings = node_settings(node.root)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, App] = {}
    stop = asyncio.Event()

    async def main() -> None:
        kubelet = FakeKubelet(settings.device_plugin_dir)
        await kubelet.start()
        agent = build_agent(settings, parse_config(CX7_CONFIG))
        runner = asyncio.create_task(agent.run())
        await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == 4, timeout=20)
        holder["agent"] = agent
        ready.set()
        await stop.wait()
        await agent.shutdown()
        await asyncio.gather(runner, return_exceptions=True)
        await kubelet.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30), "the agent did not come up"
    sock = os.path.join(settings.device_plugin_dir, "nvidia.com_cx7_qsfp.sock")
    with grpc.insecure_channel(f"unix:{sock}", options=[("grpc.max_receive_message_length", 8 << 20)]) as ch:
        yield Running(holder["agent"], settings, api_pb2_grpc.DevicePluginStub(ch))
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    loop.close()
    shutil.rmtree(base, ignore_errors=True)


ids = st.one_of(
    st.sampled_from(VFS),
    st.sampled_from(["0002:01:00.0", "0000:42:00.7", "", "0002:01:00.2 ", "0002:01:00.2\x00"]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
    st.integers(min_value=60, max_value=70).map(lambda n: "0" * n),  # around the length limit
    st.just("0002:01:00.2" + "x" * 200_000),
)
id_lists = st.lists(ids, max_size=6)


@settings(max_examples=150)
@given(st.lists(id_lists, max_size=4))
def test_allocate_is_ok_or_invalid_argument_and_a_refusal_changes_nothing(running: Running,
                                                                          requests: list[list[str]]) -> None:
    files, allocations = running.devinfo(), dict(running.agent.ledger.records)
    req = api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=r) for r in requests])
    try:
        resp = running.stub.Allocate(req, timeout=20)
    except grpc.RpcError as e:
        assert e.code() in ALLOWED, (e.code(), (e.details() or "")[:200])
        assert len(e.details() or "") < 400
        assert running.devinfo() == files and running.agent.ledger.records == allocations
        return
    assert len(resp.container_responses) == len(requests)
    for r, ids_ in zip(resp.container_responses, requests, strict=True):
        assert r.envs["PCIDEVICE_NVIDIA_COM_CX7_QSFP"] == ",".join(ids_)
        assert set(ids_) <= set(VFS) and len(set(ids_)) == len(ids_)


@settings(max_examples=150)
@given(available=id_lists, must=id_lists, size=st.integers(min_value=-(2**31), max_value=2**31 - 1),
       more=st.integers(min_value=0, max_value=2))
def test_preferred_allocation_answers_only_from_available(running: Running, available: list[str],
                                                         must: list[str], size: int, more: int) -> None:
    req = api_pb2.PreferredAllocationRequest(container_requests=[
        api_pb2.ContainerPreferredAllocationRequest(
            available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size)] * (1 + more))
    try:
        resp = running.stub.GetPreferredAllocation(req, timeout=20)
    except grpc.RpcError as e:
        assert e.code() in ALLOWED, (e.code(), (e.details() or "")[:200])
        assert len(e.details() or "") < 400
        return
    assert set(must) <= set(available)
    for r in resp.container_responses:
        assert set(r.deviceIDs) <= set(available)
        assert len(set(r.deviceIDs)) == len(r.deviceIDs) <= max(size, 0)
