"""The container image, built from the real Dockerfile for linux/amd64 and linux/arm64 and run the way the
DaemonSet runs it: its entrypoint, its arguments and env, its volumes, a read-only root filesystem.

The build uses a Python base made from Debian packages where the Dockerfile names python:3.11-slim (the
registry is out of reach here); nothing else differs from `make image`. arm64 runs under qemu-user.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import time
import tomllib
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.settings import env_name
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import dgx_spark
from agent.sim.podresources import FakePodResources
from tests.conftest import free_port
from tests.deploy.conftest import BASE, kustomize
from tests.deploy.test_deploy_manifests import agent_container, base_config, pod_spec

from .imageharness import (
    ELF_MACHINE,
    MEASURED,
    REPO,
    Built,
    Mount,
    Result,
    Store,
    container_command,
    container_env,
    elf_machine,
    in_root,
    outside,
    run,
    traced_child,
    write_attempts,
)

pytestmark = [pytest.mark.image, pytest.mark.timeout(1800)]

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
NODE_NAME = "dgx-spark-1"


@dataclass(frozen=True)
class Image:
    arch: str
    ref: str
    root: Path  # a mounted container of the image
    config: dict[str, Any]  # the image's OCI config: Env, Entrypoint


@pytest.fixture
def image(store: Store, built: Built, rootfs_of: dict[str, Path], arch: str) -> Image:
    ref = built.refs[arch]
    return Image(arch, ref, rootfs_of[arch], store.inspect(ref)["OCIv1"]["config"])


def site_packages(root: Path) -> Path:
    """The directory pip installed the agent into (dist-packages on Debian's Python, site-packages on
    python.org's)."""
    (agent,) = [p for p in root.glob("usr/local/lib/python3*/*-packages/agent") if p.is_dir()]
    return agent.parent


def locked_pins() -> dict[str, str]:
    text = re.sub(r"\\\n", " ", (REPO / "requirements.lock").read_text())
    lines = [line.strip() for line in text.splitlines()]
    pins = (line.split()[0] for line in lines if line and not line.startswith("#"))
    return {canonical(name): version for name, _, version in (p.partition("==") for p in pins)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ------------------------------------------------------------------ what was built

def test_one_manifest_list_holds_an_image_per_arch(store: Store, built: Built, image: Image) -> None:
    """The list a registry serves to amd64 and arm64 nodes, and each instance really is for its CPU."""
    platforms = {(m["platform"]["os"], m["platform"]["architecture"])
                 for m in store.manifest(built.name)["manifests"]}
    assert platforms == {("linux", "amd64"), ("linux", "arm64")}
    arch, root = image.arch, image.root
    oci = store.inspect(image.ref)["OCIv1"]
    assert (oci["os"], oci["architecture"]) == ("linux", arch)
    python = root / in_root(root, "/usr/bin/python3").lstrip("/")
    (cygrpc,) = (site_packages(root) / "grpc/_cython").glob("cygrpc.*.so")
    assert elf_machine(python) == ELF_MACHINE[arch]
    assert elf_machine(cygrpc) == ELF_MACHINE[arch], f"{cygrpc.name}: grpcio wheel for the wrong CPU"
    layers = store.layer_sizes(image.ref)
    base = store.layer_sizes(f"{built.base}-{arch}")
    assert layers[:len(base)] == base, "the image is built on the stand-in base"
    MEASURED[f"{arch}: image size, uncompressed [MB]"] = round(sum(layers) / 1e6, 1)
    MEASURED[f"{arch}: of which the Dockerfile's layers [MB]"] = round(sum(layers[len(base):]) / 1e6, 1)


def test_image_holds_this_trees_agent_and_exactly_the_locked_packages(image: Image) -> None:
    site = site_packages(image.root)
    for source in sorted((REPO / "agent").rglob("*.py")):
        installed = site / source.relative_to(REPO)
        assert installed.exists(), f"{installed.relative_to(image.root)} is missing"
        assert sha256(installed) == sha256(source), \
            f"{source.relative_to(REPO)} in the image differs from this tree (a stale build?)"
    installed_dists = {}
    for meta in site.glob("*.dist-info/METADATA"):
        fields = dict(re.findall(r"^(Name|Version): (.+)$", meta.read_text(), re.M))
        installed_dists[canonical(fields["Name"])] = fields["Version"]
    expected = {**locked_pins(), "sriov-rdma-agent": VERSION}
    assert {k: installed_dists.get(k) for k in expected} == expected
    # python.org's image keeps pip (and, for 3.11, setuptools and wheel) in the same directory.
    assert set(installed_dists) - set(expected) <= {"pip", "setuptools", "wheel"}


def test_build_leaves_no_trace_of_the_hosts_ca_bundle(store: Store, built: Built, image: Image) -> None:
    """pip reached PyPI through the proxy with the host's CA bundle mounted over the base's for the RUN
    steps only: the image's bundle is the base's, and no pip configuration is left behind."""
    root = image.root
    bundle = "etc/ssl/certs/ca-certificates.crt"
    with store.rootfs(f"{built.base}-{image.arch}") as base:
        assert (root / bundle).read_bytes() == (base / bundle).read_bytes()
    for leftover in ("etc/pip.conf", "etc/xdg/pip", "root/.config/pip", "root/.cache/pip"):
        assert not (root / leftover).exists(), leftover


def test_image_carries_no_package_manager_caches(image: Image) -> None:
    """apt's lists and caches and pip's cache are build leftovers every node would pull."""
    root = image.root
    leftovers = [*root.glob("var/lib/apt/lists/*_Packages*"), *root.glob("var/cache/apt/*.bin"),
                 *root.glob("var/cache/apt/archives/*.deb"), *root.glob("root/.cache/pip")]
    assert leftovers == []


# ------------------------------------------------------------------ running it

@dataclass
class Pod:
    """The DaemonSet's container as the kubelet would start it on a simulated node: every hostPath volume
    is a directory of ``host`` (the simulated node's filesystem), the ConfigMap a directory of files."""
    root: Path
    host: Path
    argv: list[str]
    env: dict[str, str]
    mounts: list[Mount]
    writable: list[str]  # mount paths of the volumes the container may write
    health_port: int
    metrics_port: int
    probes: dict[str, str]

    def host_path(self, path: str) -> Path:
        return self.host / path.lstrip("/")


def make_pod(rendered: list[dict[str, Any]], image: Image, sim: Path,
             extra_args: tuple[str, ...] = ()) -> Pod:
    container = agent_container(rendered)
    volumes = {v["name"]: v for v in pod_spec(rendered)["volumes"]}
    host = sim / "host"
    root = image.root
    mounts, writable = [], []
    for vm in container["volumeMounts"]:
        volume = volumes[vm["name"]]
        if "hostPath" in volume:
            source = host / volume["hostPath"]["path"].lstrip("/")
        else:
            (cm,) = [o for o in rendered if o["kind"] == "ConfigMap"
                     and o["metadata"]["name"] == volume["configMap"]["name"]]
            source = sim / "configmap" / vm["name"]
            source.mkdir(parents=True)
            for key, text in cm["data"].items():
                (source / key).write_text(text)
        source.mkdir(parents=True, exist_ok=True)
        read_only = bool(vm.get("readOnly", False))
        mounts.append(Mount(source, vm["mountPath"], read_only))
        if not read_only:
            writable.append(in_root(root, vm["mountPath"]))
    env: dict[str, str] = {}
    ports: dict[str, int] = {}
    for e in container["env"]:
        value = e.get("value", NODE_NAME)  # the one valueFrom is spec.nodeName
        if e["name"] in (env_name("--metrics-address"), env_name("--health-address")):
            ports[e["name"]] = free_port()  # the host's network is shared with other tests: free ports
            value = f"{value.rpartition(':')[0]}:{ports[e['name']]}"
        env[e["name"]] = value
    argv = [*image.config["Entrypoint"], *container["args"], *extra_args]
    probes = {p: container[p]["grpc"].get("service", "") for p in ("startupProbe", "livenessProbe",
                                                                    "readinessProbe")}
    return Pod(root, host, argv, container_env(image.config, env), mounts, writable,
               ports[env_name("--health-address")], ports[env_name("--metrics-address")], probes)


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return kustomize(BASE)


def run_checked(root: Path, argv: list[str], env: dict[str, str], mounts: Sequence[Mount] = (),
                timeout: float = 180) -> Result:
    result = run(root, argv, env=env, mounts=mounts, timeout=timeout)
    assert result.returncode == 0, result.describe()
    return result


def test_version(image: Image) -> None:
    """The installed command answers, and touches nothing: not even Python's bytecode cache."""
    result = run_checked(image.root, ["sriov-rdma-agent", "--version"], container_env(image.config, {}))
    assert result.stdout.strip() == f"sriov-rdma-agent {VERSION}"
    assert outside(result.writes, []) == [], result.describe()


def test_demo_once(image: Image) -> None:
    """The demo's simulated node lives in /dev/shm (a pod's writable tmpfs); nothing else is written."""
    argv = ["sriov-rdma-agent", "demo", "--once", "--metrics-address", f"127.0.0.1:{free_port()}",
            "--health-address", f"127.0.0.1:{free_port()}"]
    result = run_checked(image.root, argv, container_env(image.config, {}))
    assert "allocatable: 4 of 4" in result.stdout
    assert "PCIDEVICE_NVIDIA_COM_CX7_QSFP=" in result.stdout
    assert outside(result.writes, ["/dev/shm"]) == [], result.describe()
    assert any(w.path.startswith("/dev/shm/sriov-rdma-demo-") for w in result.writes), \
        "the demo's own node is written: the trace sees writes"
    MEASURED[f"{image.arch}: demo --once wall time, read-only and traced [s]"] = round(result.seconds, 1)


def test_serve_dry_run_plans_and_writes_nothing(image: Image, rendered: list[dict[str, Any]],
                                                sim_root: Path) -> None:
    """The DaemonSet's command line with --dry-run on a node without VFs: the plan names the write it would
    make, and not a single file is written, not even in the writable volumes."""
    pod = make_pod(rendered, image, sim_root, ("--dry-run",))
    node = dgx_spark(pod.host, numvfs=0)
    numvfs = node.device_dir("0002:01:00.0") / "sriov_numvfs"
    result = run_checked(pod.root, pod.argv, pod.env, pod.mounts)
    assert "Plan (dry run, nothing written):" in result.stdout, result.describe()
    assert re.search(r"0002:01:00\.0.*\b4\b", result.stdout), result.stdout
    assert numvfs.read_text().strip() == "0"
    assert outside(result.writes, []) == [], result.describe()


def health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=2)
        except grpc.RpcError:
            return -1
        status: int = reply.status
        return status


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
        return text


def test_serve_as_the_daemonset_runs_it_on_a_read_only_root(image: Image, rendered: list[dict[str, Any]],
                                                            sim_root: Path) -> None:
    """Entrypoint, args, env and volumes of the DaemonSet: the agent registers with the kubelet, serves 4
    healthy VFs, answers Allocate with device-info for Multus, passes its probes, is scraped, and stops
    on SIGTERM. Its only write attempts are into the volumes the DaemonSet mounts writable."""
    pod = make_pod(rendered, image, sim_root)
    dgx_spark(pod.host)
    (resource,) = base_config(rendered).resources
    plugin_dir = pod.host_path("/var/lib/kubelet/device-plugins")
    devinfo_dir = pod.host_path("/var/run/k8s.cni.cncf.io/devinfo/dp")
    pod_resources = pod.host_path("/var/lib/kubelet/pod-resources") / "kubelet.sock"
    trace = sim_root / "strace.log"
    # Under qemu-user and strace a Python start takes seconds: generous bounds, no fixed sleeps.
    timeout = 120.0
    want = resource.pfs[0].num_vfs

    async def body() -> tuple[dict[str, int], str, Any, int, float]:
        kubelet = FakeKubelet(str(plugin_dir))
        lister = FakePodResources(str(pod_resources))
        await kubelet.start()
        await lister.start()
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *container_command(pod.root, pod.mounts, pod.argv, trace), env=pod.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            await kubelet.wait_for(lambda: len(kubelet.healthy(resource.resource_name)) == want,
                                   timeout=timeout)
            registered = time.monotonic() - started
            statuses: dict[str, int] = {}
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                statuses = {probe: await asyncio.to_thread(health, pod.health_port, service)
                            for probe, service in pod.probes.items()}
                if all(v == health_pb2.HealthCheckResponse.SERVING for v in statuses.values()):
                    break
                await asyncio.sleep(0.2)
            metrics = await asyncio.to_thread(scrape, pod.metrics_port)
            device = sorted(kubelet.healthy(resource.resource_name))[0]
            allocated = await kubelet.allocate(resource.resource_name, [device])
        finally:
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                os.kill(traced_child(proc.pid), signal.SIGTERM)
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout)
            except TimeoutError:
                proc.kill()
                out, _ = await proc.communicate()
            await lister.stop()
            await kubelet.stop()
        assert proc.returncode == 0, out.decode()[-6000:]
        return statuses, metrics, allocated, proc.returncode, registered

    statuses, metrics, allocated, _, registered = asyncio.run(body())
    assert statuses == dict.fromkeys(pod.probes, health_pb2.HealthCheckResponse.SERVING)
    assert "sriov_rdma" in metrics
    assert any(k.startswith("PCIDEVICE_NVIDIA_COM_CX7_QSFP") for k in allocated.envs)
    assert list(devinfo_dir.glob("*.json")), "Allocate wrote the device-info file for Multus"
    assert [p.name for p in plugin_dir.glob("*.sock") if p.name != "kubelet.sock"] == [], \
        "SIGTERM leaves no plugin socket behind"

    writes = write_attempts(trace, pod.root)
    stray = outside(writes, pod.writable)
    assert stray == [], "write attempts outside the writable volumes:\n" + "\n".join(
        f"{w.syscall} {w.path}" for w in stray)
    # The trace is live: it saw the plugin socket being bound and the device-info file being written.
    assert any(w.syscall == "bind" and w.path.startswith("/var/lib/kubelet/device-plugins/") for w in writes)
    devinfo = in_root(pod.root, "/var/run/k8s.cni.cncf.io/devinfo/dp")
    assert any(w.path.startswith(devinfo + "/") for w in writes)
    MEASURED[f"{image.arch}: serve: start to 4 healthy devices, traced [s]"] = round(registered, 1)


def test_a_write_to_the_root_fails_and_is_reported(image: Image) -> None:
    """The two guards above can fail: a process that writes to the image's root gets EROFS, and the
    trace reports the attempt."""
    script = "open('/var/lib/agent-state', 'w')"
    result = run(image.root, ["python3", "-c", script], env=container_env(image.config, {}))
    assert result.returncode != 0
    assert "Read-only file system" in result.stderr
    assert [(w.syscall, w.path) for w in result.writes] == [("openat", "/var/lib/agent-state")]

