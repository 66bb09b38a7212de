"""The DaemonSet's own command line, env and ConfigMap start a working agent.

The container's view is rebuilt under a temporary root: the host's /sys and /dev (a simulated DGX
Spark) where the pod mounts them, the kubelet directories, and the ConfigMap at its mount path. Every
path argument of the container is re-rooted there, the ports are swapped for free ones (the host part
is kept), and `python -m agent serve` runs with exactly the container's remaining arguments and env.
The kubelet stand-in then sees the resource, and the probes' gRPC health services answer SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.settings import env_name
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import dgx_spark
from tests.conftest import free_port

from .conftest import REPO, Obj
from .test_deploy_manifests import RESOURCE, agent_container, base_config, pod_spec

PATH_FLAGS = ("--config", "--sysfs-root", "--dev-root", "--device-plugin-dir", "--devinfo-dir", "--state-dir",
              "--pod-resources-socket")
ADDRESS_FLAGS = ("--metrics-address", "--health-address")


def container_view(base: list[Obj], root: Path) -> tuple[list[str], dict[str, str], dict[int, int]]:
    """Lay out the pod's filesystem under ``root``; return its re-rooted args, its env with free ports
    and re-rooted paths (and a node name for spec.nodeName), and the port swaps."""
    args = []
    for arg in agent_container(base)["args"]:
        flag, _, value = arg.partition("=")
        assert flag not in ADDRESS_FLAGS, "addresses are env vars (see daemonset.yaml)"
        args.append(f"{flag}={root}{value}" if flag in PATH_FLAGS else arg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRIOV_RDMA_AGENT_")}
    ports = {}
    for e in agent_container(base)["env"]:
        value = e.get("value", "dgx-spark-1")  # the one valueFrom is spec.nodeName
        if e["name"] in {env_name(f) for f in ADDRESS_FLAGS}:
            host, _, port = value.rpartition(":")
            ports[int(port)] = free_port()
            value = f"{host}:{ports[int(port)]}"
        if e["name"] in {env_name(f) for f in PATH_FLAGS} | {env_name("--status-socket")}:
            value = f"{root}{value}"  # host paths and the status socket, under the container root
        env[e["name"]] = value
    config_volume = next(v for v in pod_spec(base)["volumes"] if "configMap" in v)
    mounts = agent_container(base)["volumeMounts"]
    config_mount = next(m for m in mounts if m["name"] == config_volume["name"])
    config_dir = root / config_mount["mountPath"].lstrip("/")
    config_dir.mkdir(parents=True)
    (cm,) = [o for o in base if o["kind"] == "ConfigMap" and o["metadata"]["name"] ==
             config_volume["configMap"]["name"]]
    for key, text in cm["data"].items():
        (config_dir / key).write_text(text)
    return args, env, ports


def scrape_port(base: list[Obj]) -> int:
    """The container port the VMPodScrape scrapes."""
    (scrape,) = [o for o in base if o["kind"] == "VMPodScrape"]
    name = scrape["spec"]["podMetricsEndpoints"][0]["port"]
    port: int = next(p["containerPort"] for p in agent_container(base)["ports"] if p["name"] == name)
    return port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
        return text


def health_status(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.RpcError:
            return -1
        status: int = reply.status
        return status


def test_daemonset_command_line_serves_the_configured_vfs(base: list[Obj], sim_root: Path) -> None:
    container_root = sim_root  # short path on tmpfs: unix socket paths are capped at 107 bytes
    args, env, ports = container_view(base, container_root)
    given = [a.partition("=")[2] for a in args if a.startswith("--sysfs-root=")]
    host = Path(given[0] if given else env[env_name("--sysfs-root")])
    dgx_spark(host)
    (container_root / "var/lib/kubelet/device-plugins").mkdir(parents=True)
    container = agent_container(base)
    health_port = ports[container["readinessProbe"]["grpc"]["port"]]
    probes = {p: container[p]["grpc"].get("service", "") for p in ("startupProbe", "livenessProbe",
                                                                    "readinessProbe")}
    (resource,) = base_config(base).resources
    assert resource.resource_name == RESOURCE

    async def body() -> tuple[dict[str, int], str]:
        kubelet = FakeKubelet(str(container_root / "var/lib/kubelet/device-plugins"))
        await kubelet.start()
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "agent", "serve", *args, env=env,
                                                    cwd=REPO, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        try:
            await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == resource.pfs[0].num_vfs,
                                   timeout=20)
            statuses: dict[str, int] = {}
            for _ in range(100):
                statuses = {p: await asyncio.to_thread(health_status, health_port, svc)
                            for p, svc in probes.items()}
                if all(v == health_pb2.HealthCheckResponse.SERVING for v in statuses.values()):
                    break
                await asyncio.sleep(0.1)
            metrics = await asyncio.to_thread(scrape, ports[scrape_port(base)])
            return statuses, metrics
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=15)
            await kubelet.stop()
            assert proc.returncode == 0, out.decode()

    statuses, metrics = asyncio.run(body())
    assert statuses == dict.fromkeys(probes, health_pb2.HealthCheckResponse.SERVING)
    assert "# TYPE" in metrics and "sriov_rdma" in metrics
    assert not list((container_root / "var/lib/kubelet/device-plugins").glob("*.sock")), \
        "SIGTERM leaves no plugin socket behind"


def test_a_config_the_agent_rejects_fails_the_pod_naming_the_field(base: list[Obj], sim_root: Path) -> None:
    """A bad ConfigMap makes the container exit non-zero at once, so the rollout stops at that node."""
    args, env, _ = container_view(base, sim_root)
    config = Path(next(a for a in args if a.startswith("--config=")).partition("=")[2])
    config.write_text(config.read_text().replace("numVfs: 4", "numVfs: 4000"))
    proc = subprocess.run([sys.executable, "-m", "agent", "serve", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode != 0
    assert "resources[0].pfs[0].numVfs" in proc.stderr + proc.stdout
    assert "4000" in proc.stderr + proc.stdout
