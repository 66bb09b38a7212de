"""grpc.health.v1 over real TCP on loopback, checked with the grpcio-health-checking client stubs.

The agent runs on a simulated node against the kubelet stand-in; statuses must follow what
really works: registration with the kubelet, the PF scan, the watchers, graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from obs_node import CONFIG, RESOURCE, Node, make_node

from agent.adapters.status_server import StatusUnavailableError, fetch_status
from agent.model import PfReconcileStatus, ReconcileState
from agent.sim.kubelet import FakeKubelet

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "deviceplugin", "lifecycle", "monitor")


async def check(stub: health_pb2_grpc.HealthStub, service: str) -> int:
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return int(resp.status)


async def wait_status(stub: health_pb2_grpc.HealthStub, service: str, want: int, timeout: float = 10) -> None:
    """Follow the Watch stream until ``service`` reports ``want``."""
    async def follow() -> None:
        async for resp in stub.Watch(health_pb2.HealthCheckRequest(service=service)):
            if resp.status == want:
                return
    await asyncio.wait_for(follow(), timeout)


@contextlib.asynccontextmanager
async def running(node: Node, kubelet: FakeKubelet) -> AsyncIterator[health_pb2_grpc.HealthStub]:
    agent = node.agent
    await agent.start_observability()
    assert agent.health is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{agent.health.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        yield stub
    await agent.shutdown()
    await kubelet.stop()


def test_not_serving_until_registered_then_follows_the_kubelet(short_root: Path) -> None:
    node = make_node(short_root, health_address="127.0.0.1:0")
    kubelet = FakeKubelet(node.agent.settings.device_plugin_dir)

    async def scenario() -> None:
        async with running(node, kubelet) as stub:
            assert [await check(stub, s) for s in SERVICES] == [NOT_SERVING] * 4  # nothing works yet
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await check(stub, "liveness")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

            runner = asyncio.create_task(node.agent.run())
            await wait_status(stub, "deviceplugin", NOT_SERVING)  # serving its socket, no kubelet yet
            assert await check(stub, "") == NOT_SERVING
            await kubelet.start()
            await wait_status(stub, "", SERVING)
            assert [await check(stub, s) for s in SERVICES] == [SERVING] * 4

            # kubelet goes down and, starting again, wipes the plugin sockets before it serves
            await kubelet.stop()
            kubelet.cleanup_plugin_directory()
            await wait_status(stub, "deviceplugin", NOT_SERVING)
            assert await check(stub, "") == NOT_SERVING
            assert await check(stub, "lifecycle") == SERVING  # the rest still works
            await kubelet.start()
            await wait_status(stub, "", SERVING)

            doc = await fetch_status(node.agent.settings.status_socket)
            assert doc["registered"] == {RESOURCE: True}
            assert len(doc["vfs"]) == 4 and all(v["healthy"] for v in doc["vfs"])
            assert doc["health"]["deviceplugin"]["serving"] is True
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    asyncio.run(scenario())


def test_graceful_shutdown_turns_every_service_not_serving(short_root: Path) -> None:
    node = make_node(short_root, health_address="127.0.0.1:0")
    kubelet = FakeKubelet(node.agent.settings.device_plugin_dir)

    async def scenario() -> None:
        await node.agent.start_observability()
        assert node.agent.health is not None
        await kubelet.start()
        runner = asyncio.create_task(node.agent.run())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{node.agent.health.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await wait_status(stub, "", SERVING)
            seen: dict[str, list[int]] = {s: [] for s in SERVICES}

            async def watch(service: str) -> None:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    async for resp in stub.Watch(health_pb2.HealthCheckRequest(service=service)):
                        seen[service].append(int(resp.status))
            watchers = [asyncio.create_task(watch(s)) for s in SERVICES]
            while not all(seen.values()):
                await asyncio.sleep(0.01)
            await node.agent.shutdown()  # what SIGTERM does in `serve`
            await asyncio.wait(watchers, timeout=5)
        assert runner.done()
        await kubelet.stop()
        for service, statuses in seen.items():
            assert statuses[0] == SERVING, service
            assert statuses[-1] == NOT_SERVING, service

    asyncio.run(scenario())


def test_lifecycle_not_serving_when_a_configured_pf_is_missing(short_root: Path) -> None:
    config = CONFIG + "      - pfName: enp9s0f0np0\n        numVfs: 2\n"
    node = make_node(short_root, config=config, health_address="127.0.0.1:0")
    kubelet = FakeKubelet(node.agent.settings.device_plugin_dir)

    async def scenario() -> None:
        await kubelet.start()
        async with running(node, kubelet) as stub:
            runner = asyncio.create_task(node.agent.run())
            await wait_status(stub, "deviceplugin", SERVING)  # the PF that exists is still served
            assert await check(stub, "lifecycle") == NOT_SERVING
            assert await check(stub, "") == NOT_SERVING
            doc = await fetch_status(node.agent.settings.status_socket)
            assert "enp9s0f0np0" in doc["health"]["lifecycle"]["reason"]
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    asyncio.run(scenario())


def test_lifecycle_follows_the_last_reconcile(short_root: Path) -> None:
    node = make_node(short_root, health_address="127.0.0.1:0")
    kubelet = FakeKubelet(node.agent.settings.device_plugin_dir)
    pf = "0002:01:00.0"

    def outcome(state: str, reason: str) -> dict[str, PfReconcileStatus]:
        return {pf: PfReconcileStatus(pf=pf, resource=RESOURCE, state=ReconcileState(state), reason=reason)}

    async def scenario() -> None:
        await kubelet.start()
        async with running(node, kubelet) as stub:
            runner = asyncio.create_task(node.agent.run())
            await wait_status(stub, "", SERVING)
            node.agent.reporter.publish_reconcile_status(outcome("error", "EIO"))
            await wait_status(stub, "lifecycle", NOT_SERVING)
            assert await check(stub, "") == NOT_SERVING
            doc = await fetch_status(node.agent.settings.status_socket)
            assert doc["health"]["lifecycle"]["reason"] == "PF 0002:01:00.0: reconcile error (EIO)"
            # refusing to shrink under a VF a pod holds is the agent doing its job
            node.agent.reporter.publish_reconcile_status(outcome("refused", "vf_in_use"))
            await wait_status(stub, "", SERVING)
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    asyncio.run(scenario())


def test_status_reports_an_unreachable_agent_clearly(short_root: Path) -> None:
    missing = str(short_root / "status.sock")
    with pytest.raises(StatusUnavailableError) as err:
        asyncio.run(fetch_status(missing, timeout=1))
    assert missing in str(err.value) and "no such socket" in str(err.value)
    stale = short_root / "stale.sock"  # a socket nobody listens on (an agent that was killed)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    with pytest.raises(StatusUnavailableError) as err:
        asyncio.run(fetch_status(str(stale), timeout=1))
    assert "UNAVAILABLE" in str(err.value)


def test_status_is_not_served_on_the_health_port(short_root: Path) -> None:
    """The health port is open to the node's network: it answers grpc.health.v1 and nothing else;
    status (pods behind every VF) is on a 0600 unix socket."""
    node = make_node(short_root, health_address="127.0.0.1:0")
    kubelet = FakeKubelet(node.agent.settings.device_plugin_dir)

    async def scenario() -> None:
        await kubelet.start()
        async with running(node, kubelet):
            assert node.agent.health is not None
            async with grpc.aio.insecure_channel(f"127.0.0.1:{node.agent.health.port}") as channel:
                call = channel.unary_unary("/sriov_rdma_agent.v1.Status/Get")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(b"{}", timeout=2)
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            mode = os.stat(node.agent.settings.status_socket).st_mode & 0o777
            assert mode == 0o600
            doc = await fetch_status(node.agent.settings.status_socket)
            assert doc["health"]["deviceplugin"]["serving"] is False and "vfs" in doc

    asyncio.run(scenario())
