"""`sriov-rdma-agent doctor` as an operator runs it: flags and env vars, next to a running agent that the
kubelet stand-in registered (real gRPC on unix sockets, the health endpoint on TCP), text and --json."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.app import build_agent
from agent.cli import main
from agent.config import parse_config
from agent.settings import Settings
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import SimNode
from agent.sim.podresources import FakePodResources, PodDevice
from tests.conftest import CX7_CONFIG, RESOURCE, free_port, node_settings

HINTED = CX7_CONFIG.replace("    pfs:", "    ncclHints: true\n    pfs:")


def flags(s: Settings) -> list[str]:
    return [
        "doctor",
        "--config",
        s.config,
        "--sysfs-root",
        s.sysfs_root,
        "--dev-root",
        s.dev_root,
        "--device-plugin-dir",
        s.device_plugin_dir,
        "--devinfo-dir",
        s.devinfo_dir,
        "--pod-resources-socket",
        s.pod_resources_socket,
        "--health-address",
        s.health_address,
        "--status-socket",
        s.status_socket,
    ]


async def deviceplugin_serving(address: str, timeout: float = 10) -> None:
    """Until the agent's health service "deviceplugin" says SERVING (the grpc Watch stream, no polling)."""
    async with asyncio.timeout(timeout), grpc.aio.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="deviceplugin")
        )
        async for reply in watch:
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                return


@contextlib.asynccontextmanager
async def node_with_agent(
    node: SimNode, config: str
) -> AsyncIterator[tuple[Settings, FakeKubelet, FakePodResources]]:
    """The agent serving (health endpoint included), registered with the kubelet stand-in, and a
    PodResources stand-in: everything a healthy node has."""
    settings = node_settings(node.root, health_address=f"127.0.0.1:{free_port()}")
    Path(settings.config).write_text(config)
    kubelet = FakeKubelet(settings.device_plugin_dir)
    pods = FakePodResources(settings.pod_resources_socket)
    await kubelet.start()
    await pods.start()
    agent = build_agent(settings, parse_config(config))
    await agent.start_observability()
    runner = asyncio.create_task(agent.run())
    try:
        await kubelet.wait_for(lambda: bool(kubelet.devices(RESOURCE)), timeout=10)
        await deviceplugin_serving(settings.health_address)
        yield settings, kubelet, pods
    finally:
        await agent.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await kubelet.stop()
        await pods.stop()


def test_doctor_on_a_healthy_node_exits_0(sim_node: SimNode, capsys: pytest.CaptureFixture[str]) -> None:
    async def body() -> int:
        async with node_with_agent(sim_node, HINTED) as (settings, kubelet, _):
            vf = kubelet.healthy(RESOURCE)[0]
            resp = await kubelet.allocate(RESOURCE, [vf])
            assert resp.envs["NCCL_IB_HCA"] == "=" + sim_node.rdma_name(vf)
            return await asyncio.to_thread(main, flags(settings))

    code = asyncio.run(body())
    out = capsys.readouterr().out
    assert code == 0, out
    assert "FAIL" not in out.split("\n\n")[-1].replace("0 FAIL", "")
    assert "PASS  registration" in out and "nvidia.com/cx7_qsfp registered" in out
    assert "PASS  kubelet.sock" in out and "PASS  PodResources" in out
    assert "4 file(s), each for a VF advertised by the running agent" in out  # one per served VF


def test_doctor_json_and_env_vars_with_the_agent_gone(
    sim_node: SimNode, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = node_settings(sim_node.root, health_address=f"127.0.0.1:{free_port()}")
    Path(settings.config).write_text(HINTED)
    for flag, value in zip(flags(settings)[1::2], flags(settings)[2::2], strict=True):
        monkeypatch.setenv("SRIOV_RDMA_AGENT_" + flag.lstrip("-").replace("-", "_").upper(), value)
    code = main(["doctor", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 == doc["exit_code"]  # no kubelet here
    by_name = {c["check"]: c for c in doc["checks"]}
    assert by_name["kubelet.sock"]["status"] == "FAIL"
    assert by_name["registration"]["status"] == "WARN"
    assert by_name["registration"]["evidence"].startswith(
        f"agent not running (no answer at {settings.health_address}"
    )
    assert by_name["numVfs"]["status"] == "PASS"
    assert doc["summary"]["FAIL"] == 1


def test_doctor_cannot_check_without_a_readable_config(
    sim_node: SimNode, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = node_settings(sim_node.root)
    code = main([*flags(settings)[:-2], "--config", str(sim_node.root / "missing.yaml")])
    assert code == 2
    assert "cannot check this node: config: --config: cannot read" in capsys.readouterr().out
    Path(settings.config).write_text("resources: []\n")
    assert main([*flags(settings)[:-2], "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"].startswith(
        "config: resources: must be a non-empty list"
    )


def test_doctor_knows_which_vf_a_pod_holds(sim_node: SimNode, capsys: pytest.CaptureFixture[str]) -> None:
    """A VF whose netdev and RDMA device left with its pod (exclusive mode) is not a broken VF."""

    async def body() -> int:
        async with node_with_agent(sim_node, HINTED) as (settings, kubelet, pods):
            vf = kubelet.healthy(RESOURCE)[0]
            await kubelet.allocate(RESOURCE, [vf])
            pods.pods.append(PodDevice("nccl", "nccl-0", "nccl", RESOURCE, (vf,)))
            sim_node.unprobe(vf)  # as rdma-cni + sriov-cni moving both into the pod look from the host
            sim_node.bind(vf, "mlx5_core")
            return await asyncio.to_thread(main, flags(settings))

    asyncio.run(body())
    out = capsys.readouterr().out
    assert "3 VFs with RDMA device and uverbs node" in out and "1 in pods" in out
