"""Faults against the real `serve` process on a simulated DGX Spark (host network namespace)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent._pb.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from agent.adapters.status_server import fetch_status
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import SimNode
from agent.sim.podresources import FakePodResources, PodDevice
from tests.conftest import CX7_CONFIG, RESOURCE
from tests.fault.conftest import Serve, serve_settings, until

pytestmark = pytest.mark.fault

Spawn = Callable[..., Serve]
OTHER = "example.com/qsfp_b"
PF0, PF1 = "0002:01:00.0", "0002:01:00.1"
PF0_VFS = [f"0002:01:00.{i}" for i in range(2, 6)]
NUM_VFS = {"enP2p1s0f0np0": 4, "enP2p1s0f1np1": 2}


def two_resources(first: list[str], second: list[str]) -> str:
    def block(name: str, pfs: list[str]) -> str:
        lines = "".join(f"      - pfName: {pf}\n        numVfs: {NUM_VFS[pf]}\n" for pf in pfs)
        return f"  - resourceName: {name}\n    pfs:\n{lines}" if pfs else ""
    return "resources:\n" + block(RESOURCE, first) + block(OTHER, second)


def publish(serve: Serve, text: str) -> None:
    """Replace the config atomically, as a ConfigMap update does."""
    path = Path(serve.settings.config)
    tmp = path.with_name(".config.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def started(spawn: Spawn, node: SimNode, config: str = CX7_CONFIG, *extra: str,
                  kubelet: bool = True, **settings: str) -> tuple[Serve, FakeKubelet]:
    s = serve_settings(node.root, **settings)
    Path(s.config).write_text(config)
    k = FakeKubelet(s.device_plugin_dir)
    if kubelet:
        await k.start()
    serve = spawn(s, *extra)
    await until(serve.answering, 30)
    if kubelet:
        await k.wait_for(lambda: len(k.healthy(RESOURCE)) == 4, timeout=30)
    return serve, k


def health(serve: Serve, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{serve.health_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                           timeout=5)
        return int(reply.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ------------------------------------------------------------------ 4: uncreatable plugin dir
def test_uncreatable_device_plugin_dir_is_retried_not_fatal(spawn: Spawn, sim_node: SimNode) -> None:
    """No ExceptionGroup, no exit: one log line with the reason, deviceplugin NOT_SERVING saying why,
    metrics and the other health components keep working, and it serves once the path can be made."""
    blocker = sim_node.root / "blocker"
    blocker.write_text("a file where a directory should be\n")
    plugin_dir = blocker / "device-plugins"

    async def body() -> None:
        serve, _ = await started(spawn, sim_node, kubelet=False, device_plugin_dir=str(plugin_dir))
        await until(lambda: serve.answering() and serve.metric("sriov_rdma_callback_errors_total") >= 3,
                    30)
        doc = await fetch_status(serve.settings.status_socket)
        assert doc["health"]["deviceplugin"]["serving"] is False
        assert "Not a directory" in doc["health"]["deviceplugin"]["reason"]
        assert await asyncio.to_thread(health, serve, "deviceplugin") == NOT_SERVING
        assert await asyncio.to_thread(health, serve, "lifecycle") == SERVING
        assert await asyncio.to_thread(health, serve, "monitor") == SERVING
        errors = [x for x in serve.lines() if x["level"] == "error"]
        assert len(errors) == 1 and "Not a directory" in errors[0]["msg"], errors
        assert "Traceback" not in serve.text() and "ExceptionGroup" not in serve.text()
        blocker.unlink()  # the operator fixes the mount: the next retry serves
        kubelet = FakeKubelet(str(plugin_dir))
        await kubelet.start()
        try:
            await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == 4, timeout=45)
            await until(lambda: health(serve, "deviceplugin") == SERVING, 10)
        finally:
            await kubelet.stop()

    asyncio.run(body())


# ------------------------------------------------------------------ 5 and flat resources
async def _list_and_watch_once(socket_path: str) -> int:
    """One ListAndWatch on a connection of its own: read the first list, hang up."""
    # A local subchannel pool: grpc would otherwise reuse one connection for every channel.
    options = [("grpc.default_authority", "localhost"), ("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(f"unix:{socket_path}", options=options) as channel:
        call = api_pb2_grpc.DevicePluginStub(channel).ListAndWatch(api_pb2.Empty())
        first = await call.read()
        call.cancel()
        return len(first.devices)  # type: ignore[union-attr]


def test_1000_list_and_watch_reconnects_leave_tasks_fds_threads_flat(
        spawn: Spawn, sim_node: SimNode, capsys: pytest.CaptureFixture[str]) -> None:
    async def body() -> None:
        serve, kubelet = await started(spawn, sim_node)
        sock = os.path.join(serve.settings.device_plugin_dir, "nvidia.com_cx7_qsfp.sock")
        for _ in range(20):
            await _list_and_watch_once(sock)  # warm-up: grpc's pools and caches
        before = await serve.settled_usage(await asyncio.to_thread(serve.usage))
        for _ in range(1000):
            assert await _list_and_watch_once(sock) == 4
        after = await serve.settled_usage(before)
        with capsys.disabled():
            print(f"\n1000 ListAndWatch reconnects: before {before}; after {after}")
        assert after.tasks - before.tasks <= 5, (before, after)
        assert after.fds - before.fds <= 3, (before, after)
        assert after.threads - before.threads <= 1, (before, after)
        assert after.rss_kib - before.rss_kib < 20 * 1024, (before, after)
        assert kubelet.endpoints[RESOURCE].stopped is False  # the kubelet's own stream was never touched
        await kubelet.stop()

    asyncio.run(body())


def test_5000_allocates_leave_resources_flat(spawn: Spawn, sim_node: SimNode,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    async def body() -> None:
        serve, kubelet = await started(spawn, sim_node)
        for i in range(50):
            await kubelet.allocate(RESOURCE, [PF0_VFS[i % 4]])
        before = await serve.settled_usage(await asyncio.to_thread(serve.usage))
        for i in range(5000):
            resp = await kubelet.allocate(RESOURCE, [PF0_VFS[i % 4]])
            assert resp.envs["PCIDEVICE_NVIDIA_COM_CX7_QSFP"] == PF0_VFS[i % 4]
        after = await serve.settled_usage(before)
        with capsys.disabled():
            print(f"\n5000 Allocates: before {before}; after {after}")
        assert after.tasks - before.tasks <= 5 and after.fds - before.fds <= 3, (before, after)
        assert after.threads - before.threads <= 1 and after.rss_kib - before.rss_kib < 20 * 1024
        await kubelet.stop()

    asyncio.run(body())


def test_200_kubelet_restarts_leave_resources_flat(spawn: Spawn, sim_node: SimNode,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    async def body() -> None:
        serve, kubelet = await started(spawn, sim_node)

        async def restart() -> None:
            n = len(kubelet.registrations)
            await kubelet.restart()  # sockets wiped, new kubelet.sock: re-serve and register again
            await kubelet.wait_for(lambda: len(kubelet.registrations) > n
                                   and len(kubelet.healthy(RESOURCE)) == 4, timeout=30)

        for _ in range(5):
            await restart()
        before = await serve.settled_usage(await asyncio.to_thread(serve.usage))
        for _ in range(200):
            await restart()
        after = await serve.settled_usage(before)
        with capsys.disabled():
            print(f"\n200 kubelet restarts: before {before}; after {after}")
        assert after.tasks - before.tasks <= 5 and after.fds - before.fds <= 3, (before, after)
        assert after.threads - before.threads <= 1 and after.rss_kib - before.rss_kib < 20 * 1024
        await kubelet.stop()

    asyncio.run(body())


# ------------------------------------------------------------------ 9: signals, a second agent
def test_sighup_reloads_the_config_and_keeps_serving(spawn: Spawn, sim_node: SimNode) -> None:
    async def body() -> None:
        serve, kubelet = await started(spawn, sim_node)
        sock = os.path.join(serve.settings.device_plugin_dir, "nvidia.com_cx7_qsfp.sock")
        inode = os.stat(sock).st_ino
        registrations = len(kubelet.registrations)
        serve.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        await serve.wait_log(lambda x: x["msg"].startswith("SIGHUP: re-reading the config"))
        await serve.wait_log(lambda x: x["msg"] == "config reloaded")
        await asyncio.sleep(0)  # the process must still be here, its socket untouched
        assert serve.alive() and os.stat(sock).st_ino == inode
        assert len(kubelet.registrations) == registrations and not kubelet.endpoints[RESOURCE].stopped
        resp = await kubelet.allocate(RESOURCE, [PF0_VFS[0]])
        assert resp.envs["PCIDEVICE_NVIDIA_COM_CX7_QSFP"] == PF0_VFS[0]
        assert serve.stop() == 0
        assert not os.path.exists(sock)
        await kubelet.stop()

    asyncio.run(body())


def _catches(pid: int, sig: int) -> bool:
    """Has the process a handler for ``sig`` yet (SigCgt in /proc/<pid>/status)?"""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


SLOW_START = """
import importlib.abc, sys, time

class SlowCli(importlib.abc.MetaPathFinder):  # a cold page cache on a node boot: imports take a while
    def find_spec(self, name, path, target=None):
        if name == "agent.cli":
            time.sleep(1.0)
        return None

sys.meta_path.insert(0, SlowCli())
"""


def test_a_sighup_while_starting_is_a_reload_not_the_end(spawn: Spawn, sim_node: SimNode, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGHUP that lands while the agent is still importing (Flux and operators send it whenever
    they like) is remembered and applied once serving starts; SIGHUP's default would end the process."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_START)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))

    async def body() -> None:
        s = serve_settings(sim_node.root)
        Path(s.config).write_text(CX7_CONFIG)
        kubelet = FakeKubelet(s.device_plugin_dir)
        await kubelet.start()
        serve = spawn(s)
        await until(lambda: _catches(serve.pid, signal.SIGHUP) or not serve.alive(), 30)
        assert not [x for x in serve.lines() if x["msg"].startswith("starting")]  # still importing
        serve.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == 4, timeout=30)
        await serve.wait_log(lambda x: x["msg"] == "config reloaded")
        assert serve.alive(), serve.text()
        assert serve.stop() == 0
        await kubelet.stop()

    asyncio.run(body())


def test_a_second_agent_exits_2_naming_the_first_and_touches_nothing(spawn: Spawn, sim_node: SimNode) -> None:
    async def body() -> None:
        first, kubelet = await started(spawn, sim_node)
        sock = os.path.join(first.settings.device_plugin_dir, "nvidia.com_cx7_qsfp.sock")
        inode = os.stat(sock).st_ino
        second = spawn(serve_settings(sim_node.root, config=first.settings.config,
                                      status_socket=str(sim_node.root / "run/second.sock")))
        code = await asyncio.to_thread(second.proc.wait, 30)  # type: ignore[union-attr]
        assert code == 2
        errors = [x for x in second.lines() if x["level"] == "error"]
        assert len(errors) == 1 and f"pid {first.pid}" in errors[0]["msg"], second.text()
        assert os.stat(sock).st_ino == inode and first.alive()
        assert len(kubelet.registrations) == 1 and not kubelet.endpoints[RESOURCE].stopped
        await kubelet.stop()

    asyncio.run(body())


def test_sigkill_with_allocated_vfs_then_restart_destroys_nothing(spawn: Spawn, sim_node: SimNode) -> None:
    """The node lock is the kernel's: a killed agent leaves no stale lock, and nothing of the node changes."""
    vf_dirs = sorted(str(p) for p in (sim_node.sys / "bus/pci/devices").iterdir())

    async def body() -> None:
        serve, kubelet = await started(spawn, sim_node)
        for vf in PF0_VFS[:2]:
            await kubelet.allocate(RESOURCE, [vf])
        advertised = sorted(kubelet.devices(RESOURCE))
        serve.stop(signal.SIGKILL)
        again = spawn(serve.settings)
        n = len(kubelet.registrations)
        await kubelet.wait_for(lambda: len(kubelet.registrations) > n and len(kubelet.healthy(RESOURCE)) == 4,
                               timeout=30)
        assert sorted(kubelet.devices(RESOURCE)) == advertised and again.alive()
        await kubelet.stop()

    asyncio.run(body())
    assert sorted(str(p) for p in (sim_node.sys / "bus/pci/devices").iterdir()) == vf_dirs
    assert (sim_node.device_dir(PF0) / "sriov_numvfs").read_text().strip() == "4"


# ------------------------------------------------------------------ 10: status off the network
def test_status_is_on_a_unix_socket_and_does_not_amplify(spawn: Spawn, sim_node: SimNode) -> None:
    async def body() -> None:
        s = serve_settings(sim_node.root)
        pods = FakePodResources(s.pod_resources_socket)
        pods.pods = [PodDevice("ml", "trainer-0", "nccl", RESOURCE, (PF0_VFS[1],))]
        await pods.start()
        serve, kubelet = await started(spawn, sim_node)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{serve.health_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary("/sriov_rdma_agent.v1.Status/Get")(b"{}", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # the network sees health only
        assert os.stat(serve.settings.status_socket).st_mode & 0o777 == 0o600
        cmd = [sys.executable, "-m", "agent", "status", "--json", "--status-socket",
               serve.settings.status_socket]
        out = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=30,
                                      check=True)
        doc = json.loads(out.stdout)
        owners = {v["vf"]: v["owner"] for v in doc["vfs"]}
        assert owners[PF0_VFS[1]] == {"namespace": "ml", "pod": "trainer-0", "container": "nccl"}
        calls = pods.calls
        docs = await asyncio.gather(*(fetch_status(serve.settings.status_socket) for _ in range(100)))
        assert all(len(d["vfs"]) == 4 for d in docs)
        assert pods.calls - calls <= 2, pods.calls - calls  # 100 status calls, at most 2 List calls
        await kubelet.stop()
        await pods.stop()

    asyncio.run(body())


# ------------------------------------------------------------------ 11: reload on any sysfs root
def test_resource_set_changes_apply_live_without_disturbing_the_unchanged_one(spawn: Spawn,
                                                                               sim_node: SimNode) -> None:
    sim_node.set_pf_link(PF1, True)
    pf1_vfs = sim_node.create_vfs(PF1, 2)

    async def body() -> None:
        serve, kubelet = await started(spawn, sim_node, two_resources(["enP2p1s0f0np0"], []))
        await serve.wait_log(lambda x: x["msg"].startswith("VF writes are off"))
        ep = kubelet.endpoints[RESOURCE]
        updates = len(ep.updates)
        sock = os.path.join(serve.settings.device_plugin_dir, "nvidia.com_cx7_qsfp.sock")
        inode = os.stat(sock).st_ino

        publish(serve, two_resources(["enP2p1s0f0np0"], ["enP2p1s0f1np1"]))  # a new resource
        await kubelet.wait_for(lambda: sorted(kubelet.healthy(OTHER)) == pf1_vfs, timeout=30)
        assert [r for _, r in kubelet.registrations].count(RESOURCE) == 1
        assert kubelet.endpoints[RESOURCE] is ep and not ep.stopped and os.stat(sock).st_ino == inode
        assert len(ep.updates) == updates  # its stream stayed open and had nothing new to say

        held = (await kubelet.allocate(OTHER, [pf1_vfs[0]])).envs["PCIDEVICE_EXAMPLE_COM_QSFP_B"]
        publish(serve, two_resources(["enP2p1s0f0np0", "enP2p1s0f1np1"], []))  # PF1 moves, OTHER goes
        # OTHER keeps serving the VF a pod holds (and only that one); RESOURCE gets the free VF.
        await kubelet.wait_for(lambda: sorted(kubelet.devices(RESOURCE)) == sorted([*PF0_VFS, pf1_vfs[1]])
                               and sorted(kubelet.devices(OTHER)) == [held], timeout=30)
        assert not kubelet.endpoints[OTHER].stopped and kubelet.endpoints[RESOURCE] is ep

        publish(serve, two_resources(["enP2p1s0f0np0"], []))  # PF1 leaves RESOURCE again
        await kubelet.wait_for(lambda: sorted(kubelet.devices(RESOURCE)) == PF0_VFS, timeout=30)
        assert [r for _, r in kubelet.registrations].count(RESOURCE) == 1 and not ep.stopped
        assert serve.alive()
        await kubelet.stop()

    asyncio.run(body())


def test_a_removed_resource_stops_its_server_and_the_other_stays(spawn: Spawn, sim_node: SimNode) -> None:
    sim_node.create_vfs(PF1, 2)

    async def body() -> None:
        serve, kubelet = await started(spawn, sim_node, two_resources(["enP2p1s0f0np0"], ["enP2p1s0f1np1"]))
        await kubelet.wait_for(lambda: len(kubelet.devices(OTHER)) == 2, timeout=30)
        ep = kubelet.endpoints[RESOURCE]
        publish(serve, two_resources(["enP2p1s0f0np0"], []))
        await kubelet.wait_for(lambda: kubelet.endpoints[OTHER].stopped, timeout=30)
        other_sock = os.path.join(serve.settings.device_plugin_dir, "example.com_qsfp_b.sock")
        await until(lambda: not os.path.exists(other_sock), 10)
        assert kubelet.endpoints[RESOURCE] is ep and not ep.stopped and len(kubelet.healthy(RESOURCE)) == 4
        doc = await fetch_status(serve.settings.status_socket)
        assert doc["registered"] == {RESOURCE: True}
        # The removed resource's device-info files go with it; the other resource's stay.
        files = sorted(os.listdir(serve.settings.devinfo_dir))
        assert files == sorted(f"nvidia.com-cx7_qsfp-{vf}-device.json" for vf in PF0_VFS), files
        await kubelet.stop()

    asyncio.run(body())


def test_an_invalid_config_on_reload_keeps_the_last_good_one(spawn: Spawn, sim_node: SimNode) -> None:
    sim_node.create_vfs(PF1, 2)

    async def body() -> None:
        serve, kubelet = await started(spawn, sim_node)
        publish(serve, "resources: [oops\n")
        await serve.wait_log(lambda x: x["msg"].startswith("new config rejected; keeping the last good one"))
        assert serve.alive() and len(kubelet.healthy(RESOURCE)) == 4
        resp = await kubelet.allocate(RESOURCE, [PF0_VFS[3]])
        assert resp.envs["PCIDEVICE_NVIDIA_COM_CX7_QSFP"] == PF0_VFS[3]
        publish(serve, two_resources(["enP2p1s0f0np0"], ["enP2p1s0f1np1"]))  # good again: applied
        await kubelet.wait_for(lambda: len(kubelet.devices(OTHER)) == 2, timeout=30)
        await kubelet.stop()

    asyncio.run(body())
