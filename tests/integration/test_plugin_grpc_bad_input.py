"""A hostile or broken device-plugin client over the real unix socket: every bad request is refused
whole with a short INVALID_ARGUMENT, and a refused call leaves nothing behind."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest

from agent._pb.deviceplugin.v1beta1 import api_pb2
from agent.core.inventory import MAX_REQUEST_IDS, devinfo_file_name
from agent.settings import Settings
from tests.conftest import CX7_CONFIG, RESOURCE, RunAgent

VFS = ["0002:01:00.2", "0002:01:00.3", "0002:01:00.4", "0002:01:00.5"]


def allocate_request(*containers: list[str]) -> api_pb2.AllocateRequest:
    return api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids) for ids in containers])


def devinfo_inodes(settings: Settings) -> dict[str, int]:
    """File name -> inode: a file rewritten (atomically, by rename) gets a new inode."""
    d = Path(settings.devinfo_dir)
    return {p.name: p.stat().st_ino for p in d.iterdir()} if d.exists() else {}


def test_a_failing_container_request_leaves_no_side_effect(sim_settings: Settings,
                                                           run_agent: RunAgent) -> None:
    """Two container requests, the second naming an unknown VF: nothing is written or recorded (every
    served VF has its device-info file from start-up; a refused call rewrites none of them)."""
    async def body() -> None:
        async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
            stub = kubelet.endpoints[RESOURCE].stub
            before = devinfo_inodes(sim_settings)
            assert sorted(before) == sorted(devinfo_file_name(RESOURCE, v) for v in VFS)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Allocate(allocate_request([VFS[0]], ["0000:42:00.7"]), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "0000:42:00.7" in (err.value.details() or "")
            assert devinfo_inodes(sim_settings) == before and agent.ledger.records == {}
            # The same VF in two container requests of one call: refused, nothing written either.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Allocate(allocate_request([VFS[0]], [VFS[0]]), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert devinfo_inodes(sim_settings) == before and agent.ledger.records == {}
            resp = await stub.Allocate(allocate_request([VFS[0]], [VFS[1]]), timeout=10)
            assert [r.envs["PCIDEVICE_NVIDIA_COM_CX7_QSFP"] for r in resp.container_responses] == VFS[:2]
            after = devinfo_inodes(sim_settings)
            assert sorted(n for n in after if after[n] != before[n]) == sorted(
                devinfo_file_name(RESOURCE, v) for v in VFS[:2])  # rewritten at Allocate, as upstream
            assert sorted(agent.ledger.records) == VFS[:2]
    asyncio.run(body())


def test_a_devinfo_write_failure_fails_the_call_and_records_nothing(sim_settings: Settings,
                                                                    run_agent: RunAgent) -> None:
    """Every served VF has its device-info file from start-up; a call that cannot rewrite one fails
    with INVALID_ARGUMENT, records no allocation and removes no served VF's file."""
    async def body() -> None:
        async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
            first = Path(sim_settings.devinfo_dir) / devinfo_file_name(RESOURCE, VFS[0])
            blocker = Path(sim_settings.devinfo_dir) / devinfo_file_name(RESOURCE, VFS[1])
            blocker.unlink()
            blocker.mkdir()  # a directory where the second file goes: the rename over it fails
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await kubelet.endpoints[RESOURCE].stub.Allocate(allocate_request([VFS[0]], [VFS[1]]),
                                                                timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert agent.ledger.records == {}
            assert first.is_file() and blocker.is_dir()
    asyncio.run(body())


def test_a_megabyte_id_gets_a_short_invalid_argument(sim_settings: Settings, run_agent: RunAgent,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    huge = "0002:01:00.2" + "x" * (1 << 20)

    async def body() -> None:
        async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await kubelet.allocate(RESOURCE, [huge])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(err.value.details() or "") < 400
            assert agent.ledger.records == {}
    with caplog.at_level(logging.INFO):
        asyncio.run(body())
    assert max(len(r.getMessage()) + len(str(getattr(r, "device", ""))) for r in caplog.records) < 1000


def test_duplicate_and_too_many_ids_are_refused(sim_settings: Settings, run_agent: RunAgent) -> None:
    async def body() -> None:
        async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
            before = devinfo_inodes(sim_settings)
            many = [*VFS, *(f"0000:{i // 256 % 256:02x}:{i % 256:02x}.0" for i in range(MAX_REQUEST_IDS))]
            for ids in ([VFS[0], VFS[0], VFS[0]], many):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await kubelet.allocate(RESOURCE, ids)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert len(err.value.details() or "") < 400
            assert devinfo_inodes(sim_settings) == before and agent.ledger.records == {}
    asyncio.run(body())


def test_duplicate_ids_name_the_repeated_one(sim_settings: Settings, run_agent: RunAgent) -> None:
    async def body() -> None:
        async with run_agent(sim_settings, CX7_CONFIG) as (_, kubelet):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await kubelet.allocate(RESOURCE, [VFS[1], VFS[0], VFS[1]])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"device {VFS[1]}: devices_ids: named more than once" in (err.value.details() or "")
    asyncio.run(body())


def test_preferred_allocation_never_answers_outside_available(sim_settings: Settings,
                                                              run_agent: RunAgent) -> None:
    """The kubelet passes its reusable devices in both lists; a must_include outside available is a
    contradiction, refused, never echoed back as a choice."""
    async def body() -> None:
        async with run_agent(sim_settings, CX7_CONFIG) as (_, kubelet):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await kubelet.preferred(RESOURCE, VFS[:2], ["0002:01:00.5"], 2)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not in available_deviceIDs" in (err.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await kubelet.preferred(RESOURCE, ["x" * (1 << 20)], [], 1)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(err.value.details() or "") < 400
            assert await kubelet.preferred(RESOURCE, VFS[:2], [VFS[1]], 2) == [VFS[1], VFS[0]]
    asyncio.run(body())
