"""Process settings: command-line flags, each also settable by an environment variable.

Precedence is flag > environment > default, resolved only in cli.py. The names here are a
contract with operators and the DaemonSet manifests: extend, never rename.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import ConfigError

ENV_PREFIX = "SRIOV_RDMA_AGENT_"

DEFAULT_CONFIG = "/etc/sriov-rdma-agent/config.yaml"  # inside the container: a mounted ConfigMap
DEFAULT_DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
DEFAULT_DEVINFO_DIR = "/var/run/k8s.cni.cncf.io/devinfo/dp"
# Agent-owned state that must outlive a container restart but not a reboot (tmpfs on Talos).
DEFAULT_STATE_DIR = "/var/run/sriov-rdma-agent"
DEFAULT_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
# 9808 is the port the SR-IOV network metrics exporter uses; users replacing it keep their scrape config.
DEFAULT_METRICS_ADDRESS = "0.0.0.0:9808"
DEFAULT_HEALTH_ADDRESS = "0.0.0.0:9809"
# `status` names the pods behind every VF: a unix socket in the agent's own run directory (an
# emptyDir in the DaemonSet), reachable only from inside the container (`kubectl exec`).
DEFAULT_STATUS_SOCKET = "/var/run/sriov-rdma-agent/status.sock"
KUBELET_SOCKET_NAME = "kubelet.sock"


@dataclass(frozen=True)
class Settings:
    config: str = DEFAULT_CONFIG
    sysfs_root: str = "/"
    dev_root: str = "/"
    device_plugin_dir: str = DEFAULT_DEVICE_PLUGIN_DIR
    devinfo_dir: str = DEFAULT_DEVINFO_DIR
    pod_resources_socket: str = DEFAULT_POD_RESOURCES_SOCKET
    state_dir: str = DEFAULT_STATE_DIR
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    health_address: str = DEFAULT_HEALTH_ADDRESS
    status_socket: str = DEFAULT_STATUS_SOCKET
    log_format: str = "text"  # "text" or "json"
    log_level: str = "info"
    node_name: str = ""  # from the downward API (spec.nodeName); seeds stable VF MACs
    dry_run: bool = False


def env_name(flag: str) -> str:
    """--device-plugin-dir -> SRIOV_RDMA_AGENT_DEVICE_PLUGIN_DIR."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def split_address(address: str, flag: str) -> tuple[str, int]:
    """"0.0.0.0:9808" / "[::1]:9808" -> (host, port); a ConfigError names the flag and value."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(flag, address, "expected host:port, e.g. 0.0.0.0:9808")
    return host.strip("[]") or "0.0.0.0", int(port)
