"""The Kustomize base and examples: they render, validate against schemas, and agree with the agent.

Built-in kinds are validated with kubernetes-validate (strict: unknown fields fail). The CRDs
(VMPodScrape, NetworkAttachmentDefinition) are validated with the JSON schemas in schemas/, written
from the operators' type definitions; the NAD's CNI config is parsed and validated as well.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

import agent
from agent import settings as defaults
from agent.adapters import health_server
from agent.adapters.sysfs import SysfsHost
from agent.cli import build_parser, settings_from_args
from agent.config import Config, parse_config
from agent.core.discovery import resolve_pfs
from agent.settings import Settings, env_name
from agent.sim.node import dgx_spark

from .conftest import REPO, Obj, only

K8S_VERSION = "1.32.0"  # schemas of a current release; nothing used is newer than GA gRPC probes (1.27)
SCHEMAS = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {
    ("operator.victoriametrics.com/v1beta1", "VMPodScrape"): "vmpodscrape.json",
    ("k8s.cni.cncf.io/v1", "NetworkAttachmentDefinition"): "network-attachment-definition.json",
}
# grpc.health.v1 services the agent publishes: overall "" plus one per component.
HEALTH_SERVICES = {health_server.OVERALL, *health_server.COMPONENTS}
RESOURCE = "nvidia.com/cx7_qsfp"


def validate(obj: Obj) -> None:
    """Raise if ``obj`` does not match its schema (built-in kinds strictly, CRDs by our schemas)."""
    crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if crd is None:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        return
    schema = json.loads((SCHEMAS / crd).read_text())
    jsonschema.validate(obj, schema, cls=jsonschema.Draft202012Validator)
    if obj["kind"] == "NetworkAttachmentDefinition":
        conflist = json.loads(obj["spec"]["config"])
        jsonschema.validate(conflist, json.loads((SCHEMAS / "cni-conflist.json").read_text()),
                            cls=jsonschema.Draft202012Validator)


def agent_container(base: list[Obj]) -> Obj:
    containers = only(base, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["agent"]
    return dict(containers[0])


def pod_spec(base: list[Obj]) -> Obj:
    return dict(only(base, "DaemonSet")["spec"]["template"]["spec"])


def container_settings(base: list[Obj], monkeypatch: pytest.MonkeyPatch, node: str = "dgx-1") -> Settings:
    """Settings exactly as the agent would build them in the pod: its args, its env, downward API."""
    for var in [v for v in os.environ if v.startswith(defaults.ENV_PREFIX)]:
        monkeypatch.delenv(var)
    for env in agent_container(base).get("env", []):
        if "value" in env:
            monkeypatch.setenv(env["name"], env["value"])
        else:
            assert env["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, env
            monkeypatch.setenv(env["name"], node)
    args = build_parser().parse_args(["serve", *agent_container(base)["args"]])
    return settings_from_args(args)


def mounts(base: list[Obj]) -> dict[str, tuple[Obj, bool]]:
    """container mountPath -> (volume, readOnly)."""
    volumes = {v["name"]: v for v in pod_spec(base)["volumes"]}
    return {m["mountPath"]: (volumes[m["name"]], bool(m.get("readOnly", False)))
            for m in agent_container(base)["volumeMounts"]}


def host_mount(base: list[Obj], container_path: str) -> tuple[str, bool]:
    """(host path, readOnly) of the hostPath volume mounted at ``container_path`` or a parent of it."""
    covering = [p for p in mounts(base) if (container_path + "/").startswith(p.rstrip("/") + "/")]
    best = max(covering, key=len, default=None)
    assert best is not None, f"nothing is mounted at {container_path}"
    volume, read_only = mounts(base)[best]
    assert "hostPath" in volume, f"{container_path} is mounted from {volume}, not the host"
    return volume["hostPath"]["path"] + container_path[len(best):], read_only


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# ------------------------------------------------------------------ rendering and schemas

def test_base_renders_the_expected_objects(base: list[Obj]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in base if o["kind"] != "ConfigMap")
    assert kinds == [("DaemonSet", "sriov-rdma-agent"), ("Namespace", "sriov-rdma-agent"),
                     ("ServiceAccount", "sriov-rdma-agent"), ("VMPodScrape", "sriov-rdma-agent")]
    for obj in base:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "sriov-rdma-agent", obj["metadata"]


def test_every_rendered_object_validates(base: list[Obj], examples: list[Obj]) -> None:
    for obj in base + examples:
        try:
            validate(obj)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {e}")


@pytest.mark.parametrize(("kind", "mutate", "complaint"), [
    ("DaemonSet", lambda o: o["spec"]["template"]["spec"].update(hostNetwrok=True), "hostNetwrok"),
    ("DaemonSet", lambda o: o["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]
     .update(port="health"), "health"),
    ("VMPodScrape", lambda o: o["spec"].update(podMetricEndpoints=[]), "podMetricEndpoints"),
    ("VMPodScrape", lambda o: o["spec"]["podMetricsEndpoints"][0].update(interval="30 seconds"),
     "30 seconds"),
])
def test_validation_rejects_broken_objects(base: list[Obj], kind: str, mutate: Any, complaint: str) -> None:
    """The schemas bite: a typo, a named gRPC probe port (unsupported) or a bad duration is refused."""
    broken = copy.deepcopy(only(base, kind))
    mutate(broken)
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)) as err:
        validate(broken)
    assert complaint in str(err.value)


# ------------------------------------------------------------------ Talos and security posture

def test_namespace_allows_privileged_pods(base: list[Obj]) -> None:
    labels = only(base, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


def test_pod_is_privileged_host_network_read_only_root(base: list[Obj]) -> None:
    spec, container = pod_spec(base), agent_container(base)
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["automountServiceAccountToken"] is False
    assert container["securityContext"] == {"privileged": True, "readOnlyRootFilesystem": True}
    assert 5 <= spec["terminationGracePeriodSeconds"] <= 30
    ds = only(base, "DaemonSet")["spec"]
    assert ds["updateStrategy"] == {"type": "RollingUpdate",
                                    "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}


def test_host_paths_are_exactly_the_agent_s_and_none_under_etc(base: list[Obj]) -> None:
    host = {v["hostPath"]["path"]: ro for v, ro in mounts(base).values() if "hostPath" in v}
    assert host == {
        "/sys": False, "/dev": True, "/var/lib/kubelet/device-plugins": False,
        "/var/lib/kubelet/pod-resources": True, "/var/run/k8s.cni.cncf.io/devinfo/dp": False,
        "/run/udev": True, "/var/run/sriov-rdma-agent": False,
    }
    assert not [p for p in host if p == "/etc" or p.startswith("/etc/")]
    assert mounts(base)["/run/udev"][1], "libudev reads /run/udev at this fixed path"


def test_runs_on_connectx_nodes_including_control_plane(base: list[Obj]) -> None:
    spec = pod_spec(base)
    required = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    terms = required["nodeSelectorTerms"]
    keys = {e["key"] for t in terms for e in t["matchExpressions"]}
    assert "feature.node.kubernetes.io/pci-15b3.present" in keys
    assert all(k.endswith("15b3.present") for k in keys)
    assert {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists",
            "effect": "NoSchedule"} in spec["tolerations"]


# ------------------------------------------------------------------ agreement with the agent

def test_container_flags_and_env_parse_into_the_agent_defaults(base: list[Obj],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    s = container_settings(base, monkeypatch, node="dgx-spark-2")
    assert s.config == defaults.DEFAULT_CONFIG
    assert s.device_plugin_dir == defaults.DEFAULT_DEVICE_PLUGIN_DIR
    assert s.devinfo_dir == defaults.DEFAULT_DEVINFO_DIR
    assert s.pod_resources_socket == defaults.DEFAULT_POD_RESOURCES_SOCKET
    assert s.metrics_address == defaults.DEFAULT_METRICS_ADDRESS
    assert s.health_address == defaults.DEFAULT_HEALTH_ADDRESS
    assert s.node_name == "dgx-spark-2"
    assert s.log_format == "json"


def test_status_inside_the_pod_finds_the_agent(base: list[Obj], monkeypatch: pytest.MonkeyPatch) -> None:
    """`kubectl exec <pod> -- sriov-rdma-agent status` asks the unix socket the agent serves status on,
    even after a patch moves it: the path is an env var of the container, which `status` reads too.
    The socket's directory is the agent's own writable state directory (the root filesystem is
    read-only; the socket is 0600), never a port."""
    assert not [a for a in agent_container(base)["args"] if a.startswith("--status-socket")]
    s = container_settings(base, monkeypatch)
    assert s.status_socket == defaults.DEFAULT_STATUS_SOCKET
    volume, read_only = mounts(base)[str(Path(s.status_socket).parent)]
    assert not read_only and volume.get("hostPath", {}).get("path") == s.state_dir
    patched = copy.deepcopy(base)
    for env in agent_container(patched)["env"]:
        if env["name"] == env_name("--status-socket"):
            env["value"] = "/var/run/sriov-rdma-agent/other.sock"
    s = container_settings(patched, monkeypatch)
    assert s.status_socket == "/var/run/sriov-rdma-agent/other.sock"
    assert build_parser().parse_args(["status"]).status_socket == s.status_socket


def test_doctor_inside_the_pod_checks_the_host_the_agent_manages(base: list[Obj],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`kubectl exec <pod> -- sriov-rdma-agent doctor` (no flags) sees the same host paths as `serve`."""
    s = container_settings(base, monkeypatch)
    assert (s.sysfs_root, s.dev_root) == ("/host", "/host")
    d = settings_from_args(build_parser().parse_args(["doctor"]))
    for name in ("config", "sysfs_root", "dev_root", "device_plugin_dir", "devinfo_dir",
                 "pod_resources_socket", "health_address"):
        assert getattr(d, name) == getattr(s, name), name


def test_every_env_var_names_a_flag(base: list[Obj]) -> None:
    known = {env_name("--" + f.name.replace("_", "-")) for f in fields(Settings)}
    for env in agent_container(base)["env"]:
        assert env["name"] in known, f"{env['name']} is not a flag of sriov-rdma-agent serve"


def test_every_path_the_agent_uses_is_mounted_from_the_host(base: list[Obj],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    s = container_settings(base, monkeypatch)
    assert host_mount(base, s.sysfs_root.rstrip("/") + "/sys") == ("/sys", False)
    assert host_mount(base, s.dev_root.rstrip("/") + "/dev") == ("/dev", True)
    assert host_mount(base, s.device_plugin_dir) == (defaults.DEFAULT_DEVICE_PLUGIN_DIR, False)
    assert host_mount(base, s.devinfo_dir) == (defaults.DEFAULT_DEVINFO_DIR, False)
    assert host_mount(base, s.pod_resources_socket) == (defaults.DEFAULT_POD_RESOURCES_SOCKET, True)
    config_volume, read_only = mounts(base)[str(Path(s.config).parent)]
    assert read_only
    cm = only(base, "ConfigMap", config_volume["configMap"]["name"])
    assert Path(s.config).name in cm["data"]


def test_ports_and_grpc_probes_match_the_agent_addresses(base: list[Obj],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    s = container_settings(base, monkeypatch)
    container = agent_container(base)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": port_of(s.metrics_address), "health": port_of(s.health_address)}
    # Probes reach the pod IP, which is the node IP with hostNetwork: never bind only to loopback.
    for address in (s.metrics_address, s.health_address):
        assert not address.startswith(("127.", "localhost", "[::1]")), address
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        grpc = container[probe]["grpc"]
        assert grpc["port"] == port_of(s.health_address), probe
        assert grpc.get("service", "") in HEALTH_SERVICES, probe
    assert container["readinessProbe"]["grpc"]["service"] == ""


def test_configmap_config_parses_and_names_the_qsfp_port(base: list[Obj]) -> None:
    config = base_config(base)
    assert [r.resource_name for r in config.resources] == [RESOURCE]
    (pf,) = config.resources[0].pfs
    assert (pf.selector.pf_name, pf.num_vfs) == ("enP2p1s0f0np0", 4)
    assert config.resources[0].rdma


def base_config(base: list[Obj]) -> Config:
    (cm,) = [o for o in base if o["kind"] == "ConfigMap" and "config.yaml" in o.get("data", {})]
    return parse_config(cm["data"]["config.yaml"])


def test_config_finds_its_pf_on_a_dgx_spark_laid_out_like_the_container(
        base: list[Obj], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DaemonSet's --sysfs-root, with the host's /sys where the pod mounts it, finds the config's PF."""
    s = container_settings(base, monkeypatch)
    container_root = tmp_path / "container"
    dgx_spark(container_root / s.sysfs_root.lstrip("/"))
    host = SysfsHost(container_root / s.sysfs_root.lstrip("/"),
                     dev_root=container_root / s.dev_root.lstrip("/"))
    config = base_config(base)
    names = [p.selector.pf_name for p in config.resources[0].pfs if p.selector.pf_name]
    resolution = resolve_pfs(config, host.list_pci(), {n: host.netdev_pci_address(n) for n in names})
    assert resolution.problems == ()
    (match,) = resolution.matches
    pf = host.read_pf(match.pci_address)
    assert pf.sriov_totalvfs is not None and match.pf.num_vfs is not None
    assert match.pf.num_vfs <= pf.sriov_totalvfs


def test_vmpodscrape_targets_the_agent_metrics_port(base: list[Obj]) -> None:
    scrape = only(base, "VMPodScrape")["spec"]
    template = only(base, "DaemonSet")["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert scrape["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in agent_container(base)["ports"]}
    (endpoint,) = scrape["podMetricsEndpoints"]
    assert endpoint["port"] in ports and ports[endpoint["port"]] == port_of(defaults.DEFAULT_METRICS_ADDRESS)
    assert endpoint["path"] == "/metrics"


def test_image_tag_is_the_package_version(base: list[Obj]) -> None:
    image = agent_container(base)["image"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert image.rpartition(":")[2] == agent.__version__ == project["version"]


def test_grafana_dashboard_configmap_is_in_the_base(base: list[Obj]) -> None:
    dashboards = [o for o in base if o["kind"] == "ConfigMap"
                  and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(dashboards) == 1
    assert dashboards[0]["metadata"]["namespace"] == "sriov-rdma-agent"
    boards = [json.loads(v) for k, v in dashboards[0]["data"].items() if k.endswith(".json")]
    assert boards and all(b["panels"] for b in boards)


# ------------------------------------------------------------------ examples

def test_nad_is_sriov_with_rdma_on_the_agent_resource(base: list[Obj], examples: list[Obj]) -> None:
    nad = only(examples, "NetworkAttachmentDefinition", "dgx-qsfp")
    assert nad["metadata"]["annotations"]["k8s.v1.cni.cncf.io/resourceName"] == RESOURCE
    assert RESOURCE in {r.resource_name for r in base_config(base).resources}
    conf = json.loads(nad["spec"]["config"])
    assert conf["name"] == "dgx-qsfp"
    sriov, rdma = conf["plugins"]
    assert (sriov["type"], rdma["type"]) == ("sriov", "rdma")
    assert sriov["ipam"]["type"] == "host-local"
    assert [r["subnet"] for rs in sriov["ipam"]["ranges"] for r in rs] == ["10.100.0.0/24"]
    assert sriov["capabilities"]["ips"] is True


def test_nccl_pods_span_two_nodes_with_one_gpu_and_one_vf_each(examples: list[Obj]) -> None:
    pods = sorted((o for o in examples if o["kind"] == "Pod"), key=lambda o: o["metadata"]["name"])
    assert len(pods) == 2
    subnet = ipaddress.ip_network("10.100.0.0/24")
    addresses = []
    for pod in pods:
        (net,) = json.loads(pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"])
        assert (net["name"], net["interface"]) == ("dgx-qsfp", "net1")
        (ip,) = net["ips"]
        addresses.append(ipaddress.ip_interface(ip).ip)
        (c,) = pod["spec"]["containers"]
        assert c["resources"]["limits"] == {"nvidia.com/gpu": 1, RESOURCE: 1}
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert {k: env[k] for k in ("NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_NET_GDR_LEVEL")} == {
            "NCCL_SOCKET_IFNAME": "net1", "NCCL_IB_DISABLE": "0", "NCCL_NET_GDR_LEVEL": "5"}
        assert env["MASTER_ADDR"] == str(addresses[0]), "rank 0 listens on its own net1 address"
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]
        anti = pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    ranks = [e["value"] for p in pods for e in p["spec"]["containers"][0]["env"] if e["name"] == "RANK"]
    assert ranks == ["0", "1"]
    assert len(set(addresses)) == 2 and all(a in subnet for a in addresses)
    namespace = only(examples, "Namespace")["metadata"]
    assert namespace["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
