"""The running agent (`sriov-rdma-agent serve` on a simulated node) seen by real tools.

promtool (Debian prometheus) lints the exposition; a real VictoriaMetrics 1.79 scrapes it with a
Prometheus-style scrape config and the series are read back through /api/v1/export; the grpc
health client sees SIGTERM turn every service NOT_SERVING; `status` prints the node.
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent._pb.podresources.v1 import api_pb2 as pr_pb2
from agent._pb.podresources.v1 import api_pb2_grpc as pr_grpc
from agent.demo import DEMO_CONFIG
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import SimNode, dgx_spark
from tests.conftest import free_port

pytestmark = pytest.mark.tools

RESOURCE = "nvidia.com/cx7_qsfp"
PF = "0002:01:00.0"
CONFIG = DEMO_CONFIG
T = TypeVar("T")
DASHBOARD = Path(__file__).resolve().parents[2] / "daemonset/grafana-dashboard.yaml"


def dashboard_exprs() -> list[str]:
    (body,) = yaml.safe_load(DASHBOARD.read_text())["data"].values()
    return [t["expr"] for p in json.loads(body)["panels"] for t in p.get("targets", [])]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run scripts/setup-tools.sh (scripts/debian-tools.txt)")
    return path


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class PodResources(pr_grpc.PodResourcesListerServicer):
    """The kubelet's PodResources List: one pod holding whatever the test assigns."""

    def __init__(self) -> None:
        self.assigned: list[str] = []

    async def List(self, request: pr_pb2.ListPodResourcesRequest,  # type: ignore[override]
                   context: grpc.aio.ServicerContext[Any, Any]) -> pr_pb2.ListPodResourcesResponse:
        devices = [pr_pb2.ContainerDevices(resource_name=RESOURCE, device_ids=self.assigned)]
        pod = pr_pb2.PodResources(name="trainer-0", namespace="ml", containers=[
            pr_pb2.ContainerResources(name="nccl", devices=devices)])
        return pr_pb2.ListPodResourcesResponse(pod_resources=[pod])


class KubeletThread:
    """The kubelet stand-in (+ PodResources) on its own event loop thread; the agent is a process."""

    def __init__(self, plugin_dir: str, pod_resources_socket: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.kubelet = self.call(self._make(plugin_dir))
        self.pods = PodResources()
        self.pod_server = self.call(self._serve_pods(pod_resources_socket))

    async def _serve_pods(self, socket_path: str) -> grpc.aio.Server:
        os.makedirs(os.path.dirname(socket_path), exist_ok=True)
        server = grpc.aio.server()
        pr_grpc.add_PodResourcesListerServicer_to_server(self.pods, server)
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()
        return server

    @staticmethod
    async def _make(plugin_dir: str) -> FakeKubelet:
        kubelet = FakeKubelet(plugin_dir)
        await kubelet.start()
        return kubelet

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.pod_server.stop(0))
        self.call(self.kubelet.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Running:
    root: Path
    sim: SimNode
    proc: subprocess.Popen[bytes]
    kubelet: KubeletThread
    metrics_url: str
    health_address: str
    log: Path

    @property
    def status_socket(self) -> str:
        return str(self.root / "run/status.sock")

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            body: bytes = r.read()
            return body.decode()


@pytest.fixture(scope="module")
def agent_proc() -> Iterator[Running]:
    root = Path(tempfile.mkdtemp(prefix="obs-tools-", dir="/tmp"))
    sim = dgx_spark(root)
    counters = root / "sys/class/infiniband" / sim.rdma_name(PF) / "ports/1"
    (counters / "counters/port_rcv_data").write_text("100\n")  # 4-byte words: 400 bytes
    (counters / "counters/port_xmit_data").write_text("250\n")
    (counters / "hw_counters/out_of_sequence").write_text("3\n")
    (root / "sys/class/net/enP2p1s0f0v0/statistics/rx_bytes").write_text("4096\n")
    (root / "config.yaml").write_text(CONFIG)
    plugin_dir = root / "var/lib/kubelet/device-plugins"
    pod_socket = root / "var/lib/kubelet/pod-resources/kubelet.sock"
    kubelet = KubeletThread(str(plugin_dir), str(pod_socket))
    mport, hport = free_port(), free_port()
    log = root / "agent.log"
    cmd = [sys.executable, "-m", "agent", "serve", "--config", str(root / "config.yaml"),
           "--sysfs-root", str(root), "--dev-root", str(root), "--device-plugin-dir", str(plugin_dir),
           "--devinfo-dir", str(root / "devinfo"),
           "--pod-resources-socket", str(pod_socket),
           "--metrics-address", f"127.0.0.1:{mport}", "--health-address", f"127.0.0.1:{hport}",
           "--status-socket", str(root / "run/status.sock")]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    running = Running(root, sim, proc, kubelet, f"http://127.0.0.1:{mport}/metrics", f"127.0.0.1:{hport}",
                      log)
    try:
        wait_until("the agent to register and advertise 4 VFs",
                   lambda: True if len(kubelet.kubelet.healthy(RESOURCE)) == 4 else None)
        pick = kubelet.kubelet.healthy(RESOURCE)[:1]
        kubelet.call(kubelet.kubelet.allocate(RESOURCE, pick))  # one Allocate for the latency histogram
        kubelet.pods.assigned = pick  # ... and the pod that got it, as PodResources reports it
        yield running
    except BaseException:
        print(log.read_text())
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        kubelet.close()
        shutil.rmtree(root, ignore_errors=True)


def test_promtool_accepts_the_exposition(agent_proc: Running) -> None:
    text = agent_proc.scrape()
    count = 'sriov_rdma_allocate_duration_seconds_count{resource="nvidia.com/cx7_qsfp",result="ok"} 1.0'
    assert count in text
    res = subprocess.run([need("promtool"), "check", "metrics"], input=text, capture_output=True, text=True,
                         timeout=30, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "" and res.stderr.strip() == ""  # not even a lint warning


def test_victoriametrics_scrapes_the_agent(agent_proc: Running, tmp_path: Path) -> None:
    vm_port = free_port()
    target = urllib.parse.urlsplit(agent_proc.metrics_url).netloc
    cfg = tmp_path / "scrape.yml"
    cfg.write_text(f"""\
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: sriov-rdma-agent
    static_configs:
      - targets: ["{target}"]
        labels: {{node: sim-spark}}
""")
    vm = subprocess.Popen([need("victoria-metrics"), f"-httpListenAddr=127.0.0.1:{vm_port}",
                           f"-storageDataPath={tmp_path / 'vm-data'}", f"-promscrape.config={cfg}",
                           "-search.latencyOffset=1s", "-loggerLevel=ERROR"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{vm_port}"

    def export(selector: str) -> list[dict[str, Any]] | None:
        url = f"{base}/api/v1/export?" + urllib.parse.urlencode({"match[]": selector})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                lines = [json.loads(x) for x in r.read().decode().splitlines() if x.strip()]
        except OSError:
            return None
        return lines or None

    try:
        rx = wait_until("VictoriaMetrics to store the port counter",
                        lambda: export("sriov_rdma_infiniband_port_data_received_bytes_total"), timeout=30)
        assert len(rx) == 1
        series = rx[0]
        assert series["metric"]["job"] == "sriov-rdma-agent"
        assert series["metric"]["node"] == "sim-spark"
        assert series["metric"]["device"] == agent_proc.sim.rdma_name(PF)
        assert series["values"][-1] == 400
        healthy = wait_until("the VF health series", lambda: export('sriov_rdma_vf_healthy{resource!=""}'))
        assert sorted(s["metric"]["vf"] for s in healthy) == [f"0002:01:00.{i}" for i in range(2, 6)]
        assert all(s["values"][-1] == 1 for s in healthy)
        held = wait_until("the allocated VF with its pod",
                          lambda: export('sriov_rdma_vf_allocated{pod="trainer-0"}'))
        assert held[0]["metric"]["namespace"] == "ml" and held[0]["metric"]["container"] == "nccl"
        assert held[0]["values"][-1] == 1
        up = wait_until("the scrape health series", lambda: export('up{job="sriov-rdma-agent"}'))
        assert up[0]["values"][-1] == 1
        # The lowered latency offset makes a fresh scrape visible to plain queries as well.
        q = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": "sum(sriov_rdma_pf_vfs)"})
        with urllib.request.urlopen(q, timeout=5) as r:
            result = json.loads(r.read())["data"]["result"]
        assert result and float(result[0]["value"][1]) == 4
        # Every query of the shipped Grafana dashboard is valid for VictoriaMetrics and the core
        # panels have data.
        with_data = 0
        for expr in dashboard_exprs():
            q = expr.replace("$__rate_interval", "1m").replace("$node", ".*")
            url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
            with urllib.request.urlopen(url, timeout=5) as r:
                answer = json.loads(r.read())
            assert answer["status"] == "success", (expr, answer)
            with_data += bool(answer["data"]["result"])
        assert with_data >= 12
    finally:
        vm.terminate()
        try:
            vm.wait(10)
        except subprocess.TimeoutExpired:
            vm.kill()
            vm.wait(5)


def test_status_command_prints_the_node(agent_proc: Running) -> None:
    out = subprocess.run([sys.executable, "-m", "agent", "status", "--status-socket",
                          agent_proc.status_socket],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert "enP2p1s0f0np0  up" in out
    assert out.count("Healthy") == 4
    assert "nvidia.com/cx7_qsfp: registered" in out
    assert "health overall: SERVING" in out
    assert "ml/trainer-0/nccl" in out
    doc = json.loads(subprocess.run([sys.executable, "-m", "agent", "status", "--json", "--status-socket",
                                     agent_proc.status_socket],
                                    capture_output=True, text=True, timeout=30, check=True).stdout)
    assert sum(v["allocated"] for v in doc["vfs"]) == 1  # the Allocate the fixture made
    assert doc["pod_resources"] is True


def test_sigterm_turns_health_not_serving_before_exit(agent_proc: Running) -> None:
    with grpc.insecure_channel(agent_proc.health_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        req = health_pb2.HealthCheckRequest(service="")
        assert stub.Check(req, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        stream = stub.Watch(req, timeout=30)  # bounded: a hung shutdown fails the test, not the run
        first = next(stream)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        os.kill(agent_proc.proc.pid, signal.SIGTERM)
        statuses = []
        try:
            for resp in stream:
                statuses.append(resp.status)
        except grpc.RpcError:
            pass  # the server went away after saying NOT_SERVING
        assert statuses[-1:] == [health_pb2.HealthCheckResponse.NOT_SERVING]
    assert agent_proc.proc.wait(20) == 0
    assert not (agent_proc.root / "var/lib/kubelet/device-plugins/nvidia.com_cx7_qsfp.sock").exists()
