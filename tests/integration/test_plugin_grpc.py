"""The agent and the kubelet stand-in over real gRPC on real unix sockets."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path

import grpc
import pytest

from agent._pb.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from agent.adapters.kubelet import register
from agent.errors import KubeletRegistrationError
from agent.settings import Settings
from agent.sim.kubelet import FakeKubelet, is_extended_resource_name
from agent.sim.node import SimNode, SimPf
from tests.conftest import CX7_CONFIG, RESOURCE, RunAgent, node_settings

VFS = ["0002:01:00.2", "0002:01:00.3", "0002:01:00.4", "0002:01:00.5"]
SOCKET_NAME = "nvidia.com_cx7_qsfp.sock"


def test_registers_and_lists_vfs_by_pci_address(sim_settings: Settings, run_agent: RunAgent) -> None:
    async def body() -> None:
        async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
            ep = kubelet.endpoints[RESOURCE]
            assert ep.socket == os.path.join(sim_settings.device_plugin_dir, SOCKET_NAME)
            assert ep.options.get_preferred_allocation_available and not ep.options.pre_start_required
            assert stat.S_IMODE(os.stat(ep.socket).st_mode) == 0o600
            assert [(d.id, d.health, d.numa) for d in ep.devices.values()] == [
                (vf, "Healthy", (0,)) for vf in VFS]
            assert agent.plugins.lifecycles[RESOURCE].registered
            assert len(kubelet.registrations) == 1 and not kubelet.rejections
        # Our socket is gone after shutdown; the kubelet saw the stream end and marked all unhealthy.
        assert not os.path.exists(os.path.join(sim_settings.device_plugin_dir, SOCKET_NAME))
        assert {d.health for d in ep.devices.values()} == {"Unhealthy"}
    asyncio.run(body())


def test_numa_minus_one_sends_no_topology(sim_root: Path, run_agent: RunAgent) -> None:
    node = SimNode(sim_root / "n", [SimPf("0000:03:00.0", "ens3f0np0", numvfs=2, numa_node=-1)]).build()
    config = "resources:\n  - {resourceName: example.com/vf, pfs: [{pfName: ens3f0np0, numVfs: 2}]}\n"

    async def body() -> None:
        async with run_agent(node_settings(node.root), config) as (_, kubelet):
            assert {i: d.numa for i, d in kubelet.devices("example.com/vf").items()} == {
                "0000:03:00.2": (), "0000:03:00.3": ()}
    asyncio.run(body())


def test_allocate_over_grpc_writes_devinfo_and_refuses_bad_ids(sim_node: SimNode, sim_settings: Settings,
                                                               run_agent: RunAgent) -> None:
    async def body() -> None:
        async with run_agent(sim_settings, CX7_CONFIG) as (_, kubelet):
            n = sim_node.rdma_name("0002:01:00.3").removeprefix("mlx5_")
            resp = await kubelet.allocate(RESOURCE, ["0002:01:00.3"])
            assert dict(resp.envs) == {
                "PCIDEVICE_NVIDIA_COM_CX7_QSFP": "0002:01:00.3",
                "PCIDEVICE_NVIDIA_COM_CX7_QSFP_INFO": json.dumps(
                    {"0002:01:00.3": {"generic": {"deviceID": "0002:01:00.3"},
                                      "rdma": {"issm": f"/dev/infiniband/issm{n}",
                                               "rdma_cm": "/dev/infiniband/rdma_cm", "rdma_dev": f"mlx5_{n}",
                                               "umad": f"/dev/infiniband/umad{n}",
                                               "uverbs": f"/dev/infiniband/uverbs{n}"}}},
                    separators=(",", ":"), sort_keys=True),
            }
            assert [(d.host_path, d.container_path, d.permissions) for d in resp.devices] == [
                (p, p, "rw") for p in (f"/dev/infiniband/issm{n}", f"/dev/infiniband/umad{n}",
                                       f"/dev/infiniband/uverbs{n}", "/dev/infiniband/rdma_cm")]
            assert not resp.mounts and not resp.annotations and not resp.cdi_devices
            devinfo = Path(sim_settings.devinfo_dir) / "nvidia.com-cx7_qsfp-0002:01:00.3-device.json"
            assert json.loads(devinfo.read_text()) == {
                "type": "pci", "version": "1.1.0",
                "pci": {"pci-address": "0002:01:00.3", "rdma-device": f"mlx5_{n}"}}
            assert stat.S_IMODE(devinfo.stat().st_mode) == 0o444
            # A second Allocate of the same VF (container restart) replaces the read-only file.
            await kubelet.allocate(RESOURCE, ["0002:01:00.3"])
            assert devinfo.exists()

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await kubelet.allocate(RESOURCE, ["0002:01:00.2", "0000:42:00.7"])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "0000:42:00.7" in (err.value.details() or "")
    asyncio.run(body())


def test_preferred_allocation_over_grpc(sim_settings: Settings, run_agent: RunAgent) -> None:
    async def body() -> None:
        async with run_agent(sim_settings, CX7_CONFIG) as (_, kubelet):
            pick = await kubelet.preferred(RESOURCE, VFS, ["0002:01:00.5"], 2)
            assert pick == ["0002:01:00.5", "0002:01:00.2"]
            assert await kubelet.preferred(RESOURCE, VFS, [], 3) == VFS[:3]
    asyncio.run(body())


def test_pf_link_down_makes_vfs_unhealthy_after_rescan_and_back(sim_node: SimNode, sim_settings: Settings,
                                                                run_agent: RunAgent) -> None:
    async def body() -> None:
        async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
            sim_node.set_pf_link("enP2p1s0f0np0", up=False)
            await agent.inventory.rescan("test: cable pulled")
            await kubelet.wait_for(lambda: kubelet.healthy(RESOURCE) == [])
            assert {d.health for d in kubelet.devices(RESOURCE).values()} == {"Unhealthy"}
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await kubelet.allocate(RESOURCE, ["0002:01:00.4"])
            assert "0002:01:00.4" in (err.value.details() or "")
            assert "no carrier" in (err.value.details() or "")
            sim_node.set_pf_link("enP2p1s0f0np0", up=True)
            await agent.inventory.rescan("test: cable back")
            await kubelet.wait_for(lambda: kubelet.healthy(RESOURCE) == VFS)
    asyncio.run(body())


@pytest.mark.parametrize("recovery", [0, 30])
def test_recovery_hold_comes_from_the_config(sim_node: SimNode, sim_settings: Settings, run_agent: RunAgent,
                                             recovery: int) -> None:
    config = CX7_CONFIG + f"health: {{recoverySeconds: {recovery}}}\n"

    async def body() -> None:
        async with run_agent(sim_settings, config) as (agent, kubelet):
            sim_node.set_pf_link("enP2p1s0f0np0", up=False)
            await agent.inventory.rescan("test: cable pulled")
            await kubelet.wait_for(lambda: kubelet.healthy(RESOURCE) == [])
            sim_node.set_pf_link("enP2p1s0f0np0", up=True)
            await agent.inventory.rescan("test: cable back")
            # Each case contradicts the 2 s default: 0 recovers well inside it, 30 still holds after it.
            if recovery == 0:
                await kubelet.wait_for(lambda: kubelet.healthy(RESOURCE) == VFS, timeout=1.0)
            else:
                await asyncio.sleep(2.5)
                assert kubelet.healthy(RESOURCE) == []
                assert {d.reason for d in agent.hub.views[RESOURCE].devices} == {
                    "PF enP2p1s0f0np0 has no carrier"}
    asyncio.run(body())


def test_kubelet_restart_deleting_sockets_leads_to_reregistration(sim_settings: Settings,
                                                                  run_agent: RunAgent) -> None:
    async def body() -> None:
        async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
            sock = os.path.join(sim_settings.device_plugin_dir, SOCKET_NAME)
            before = os.stat(sock).st_ino
            await kubelet.restart()  # removes every socket, ours included, then serves a new kubelet.sock
            await kubelet.wait_for(lambda: bool(kubelet.healthy(RESOURCE)), timeout=5)
            assert kubelet.healthy(RESOURCE) == VFS
            assert os.stat(sock).st_ino != before  # the agent listens again on a fresh socket
            assert agent.plugins.lifecycles[RESOURCE].registrations == 2
            # And a second restart works just the same.
            await kubelet.restart()
            await kubelet.wait_for(lambda: bool(kubelet.healthy(RESOURCE)), timeout=5)
            assert agent.plugins.lifecycles[RESOURCE].registrations == 3
    asyncio.run(body())


def test_kubelet_wiping_our_socket_while_we_bind_it_is_survived(sim_settings: Settings, run_agent: RunAgent,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A starting kubelet deletes sockets at any moment, also between our bind and chmod: the agent
    must serve again and register, not die (this once took the whole agent down)."""
    sock = os.path.join(sim_settings.device_plugin_dir, SOCKET_NAME)
    real_chmod = os.chmod
    wiped: list[str] = []

    def chmod_after_a_wipe(path: str, mode: int) -> None:
        if path == sock and not wiped:
            wiped.append(path)
            os.unlink(path)  # the kubelet's CleanupPluginDirectory wins the race
        real_chmod(path, mode)

    monkeypatch.setattr(os, "chmod", chmod_after_a_wipe)

    async def body() -> None:
        async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
            await kubelet.wait_for(lambda: kubelet.healthy(RESOURCE) == VFS, timeout=5)
            assert wiped == [sock]
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600  # the second socket got its chmod
            assert agent.plugins.lifecycles[RESOURCE].registered
            assert agent._run_task is not None and not agent._run_task.done()
    asyncio.run(body())


def test_a_socket_path_too_long_for_one_resource_does_not_stop_the_other(
        sim_settings: Settings, run_agent: RunAgent, caplog: pytest.LogCaptureFixture) -> None:
    long_name = "a" * 60 + ".example.com/" + "b" * 60  # a valid extended resource name
    config = CX7_CONFIG + f"  - {{resourceName: {long_name}, pfs: [{{pfName: enp1s0f0np0, numVfs: 2}}]}}\n"

    async def body() -> None:
        async with run_agent(sim_settings, config, wait_registered=False) as (agent, kubelet):
            await kubelet.wait_for(lambda: kubelet.healthy(RESOURCE) == VFS, timeout=5)
            await asyncio.sleep(0.5)  # several retries of the long one
            assert long_name not in kubelet.endpoints
            assert not agent.plugins.lifecycles[long_name].registered
            assert agent.plugins.lifecycles[RESOURCE].registered
    asyncio.run(body())
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cannot serve")]
    assert len(refusals) == 1, refusals  # said once, not once per retry
    assert "a unix socket path holds at most 107" in refusals[0]


def test_kubelet_stopping_marks_us_unregistered_until_it_returns(sim_settings: Settings,
                                                                 run_agent: RunAgent) -> None:
    async def body() -> None:
        async with run_agent(sim_settings, CX7_CONFIG) as (agent, kubelet):
            lifecycle = agent.plugins.lifecycles[RESOURCE]
            await kubelet.stop()  # kubelet.sock is removed; our socket stays
            async with asyncio.timeout(5):
                while lifecycle.registered:
                    await asyncio.sleep(0.01)
            assert os.path.exists(os.path.join(sim_settings.device_plugin_dir, SOCKET_NAME))
            assert agent.stats.get("kubelet_registrations", resource=RESOURCE) == 1
            await kubelet.start()
            await kubelet.wait_for(lambda: kubelet.healthy(RESOURCE) == VFS, timeout=5)
            async with asyncio.timeout(5):  # Register returns to us just after the stream opened
                while not lifecycle.registered:
                    await asyncio.sleep(0.01)
            assert lifecycle.registrations == 2
    asyncio.run(body())


def test_agent_started_before_the_kubelet_registers_when_it_comes_up(sim_root: Path, sim_node: SimNode,
                                                                     run_agent: RunAgent) -> None:
    settings = node_settings(sim_node.root, device_plugin_dir=str(sim_root / "dp"))  # does not exist yet

    async def body() -> None:
        async with run_agent(settings, CX7_CONFIG, start_kubelet=False) as (agent, kubelet):
            await asyncio.sleep(0.5)  # several failed attempts: the agent must keep going
            assert not agent.plugins.lifecycles[RESOURCE].registered
            await kubelet.start()
            await kubelet.wait_for(lambda: kubelet.healthy(RESOURCE) == VFS, timeout=5)
            assert agent.plugins.lifecycles[RESOURCE].registrations == 1
    asyncio.run(body())


def test_missing_pf_in_one_resource_does_not_stop_the_other(sim_settings: Settings,
                                                            run_agent: RunAgent) -> None:
    config = CX7_CONFIG + "  - {resourceName: example.com/gone, pfs: [{pfName: ens9f9np0, numVfs: 2}]}\n"

    async def body() -> None:
        async with run_agent(sim_settings, config) as (agent, kubelet):
            assert kubelet.healthy(RESOURCE) == VFS
            assert kubelet.devices("example.com/gone") == {}  # registered, with an empty list
            assert any("ens9f9np0" in p for p in agent.inventory.resolution.problems)
    asyncio.run(body())


# ---------------------------------------------------------------- the kubelet stand-in itself

def test_kubelet_rejects_bad_version_and_resource_names(sim_root: Path) -> None:
    async def body() -> None:
        # The real kubelet's blocking dial waits 10 s; a short one keeps the "nobody serves" case fast.
        kubelet = FakeKubelet(str(sim_root / "dp"), dial_timeout=0.3)
        await kubelet.start()
        try:
            with pytest.raises(KubeletRegistrationError) as err:
                await register(kubelet.socket, "x.sock", "kubernetes.io/vf")
            assert 'the ResourceName "kubernetes.io/vf" is invalid' in err.value.reason
            async with grpc.aio.insecure_channel(f"unix:{kubelet.socket}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as rpc_err:
                    await api_pb2_grpc.RegistrationStub(channel).Register(api_pb2.RegisterRequest(
                        version="v1alpha", endpoint="x.sock", resource_name="example.com/vf"))
            assert rpc_err.value.details() == ('requested API version "v1alpha" is not supported by kubelet. '
                                               'Supported version is ["v1beta1"]')
            with pytest.raises(KubeletRegistrationError) as err:
                await register(kubelet.socket, "missing.sock", "example.com/vf")
            assert "failed to dial device plugin" in err.value.reason
            assert kubelet.registrations == [] and len(kubelet.rejections) == 3
        finally:
            await kubelet.stop()
    asyncio.run(body())


def test_kubelet_startup_removes_sockets_only(sim_root: Path) -> None:
    d = sim_root / "dp"
    (d / "sub").mkdir(parents=True)
    (d / "kubelet_internal_checkpoint").write_text("{}")
    (d / "DEPRECATION").write_text("")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "stale.sock"))
    s.close()

    async def body() -> None:
        kubelet = FakeKubelet(str(d))
        await kubelet.start()
        await kubelet.stop()
    asyncio.run(body())
    assert sorted(os.listdir(d)) == ["DEPRECATION", "kubelet_internal_checkpoint", "sub"]


@pytest.mark.parametrize(("name", "ok"), [
    ("nvidia.com/cx7_qsfp", True), ("example.com/a.b-c_d", True), ("cx7", False), ("kubernetes.io/x", False),
    ("foo.kubernetes.io/x", False), ("requests.example.com/x", False), ("Example.com/x", False),
    ("example.com/-x", False), ("example.com/" + "x" * 64, False), ("example.com/a/b", False),
])
def test_extended_resource_name_rules(name: str, ok: bool) -> None:
    assert is_extended_resource_name(name) is ok
