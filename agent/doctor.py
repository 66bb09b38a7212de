"""`sriov-rdma-agent doctor`: gathers a snapshot of the node (NodeFacts) through the agent's own adapters,
runs the pure checks of agent/core/doctor.py over it and prints the verdict.

This module is the only side of doctor that touches the host: sysfs (SysfsHost), devlink, RDMA netlink,
the running agent's health endpoint, the kubelet's sockets and the mount table. What can be asked only
of the real kernel (devlink, RDMA netlink, /etc) is asked only when --sysfs-root is the host's real
sysfs; on a simulated tree the snapshot takes it from the tree or says "not checked".
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.adapters import rdma_netlink
from agent.adapters.health_server import DEVICEPLUGIN
from agent.adapters.hostinfo import is_real_sysfs, kernel_release, mount_of
from agent.adapters.netlink_vf import PyrouteVfNetlink
from agent.adapters.podresources import PodResourcesClient
from agent.adapters.status_server import fetch_status
from agent.adapters.sysfs import SysfsHost
from agent.app import load_config
from agent.config import Config
from agent.core.discovery import resolve_pfs
from agent.core.doctor import (
    AgentFacts,
    KubeFacts,
    NetnsFacts,
    NodeFacts,
    PfFacts,
    TalosFacts,
    document,
    exit_code,
    render,
    run_checks,
)
from agent.errors import AgentError, NetlinkOpError, SysfsError
from agent.settings import KUBELET_SOCKET_NAME, Settings, split_address

EXIT_CANNOT_CHECK = 2

# Where a compiled-in (not modular) piece shows itself: a sysfs path that exists only once it runs.
BUILTIN_MARKERS = {
    "mlx5_core": "bus/pci/drivers/mlx5_core",
    "mlx5_ib": "bus/auxiliary/drivers/mlx5_ib.rdma",
    "ib_uverbs": "class/infiniband_verbs",
    "rdma_ucm": "class/misc/rdma_cm",
    "ib_umad": "class/infiniband_mad",
}

EswitchReader = Callable[[str], "str | None"]


def gather(
    settings: Settings, config: Config, *, real_root: bool | None = None, eswitch: EswitchReader | None = None
) -> NodeFacts:
    """The snapshot. ``real_root`` None: decided from the mount table. ``eswitch`` reads a PF's devlink
    eswitch mode (default on the real root: devlink over pyroute2; on a simulated root: not asked)."""
    real = is_real_sysfs(settings.sysfs_root) if real_root is None else real_root
    host = SysfsHost(settings.sysfs_root, dev_root=settings.dev_root)
    if eswitch is None and real:
        eswitch = PyrouteVfNetlink().eswitch_mode
    names = {pf.selector.pf_name for _, pf in config.all_pfs() if pf.selector.pf_name}
    res = resolve_pfs(config, host.list_pci(), {n: host.netdev_pci_address(n) for n in names})
    problems = list(res.problems)
    pfs = []
    for m in res.matches:
        try:
            info = host.read_pf(m.pci_address)
        except SysfsError as e:
            problems.append(f"{m.resource.resource_name}: PF {m.pci_address}: cannot read: {e}")
            continue
        mode, asked = _eswitch(eswitch, m.pci_address)
        dev_nodes = {
            f"/dev/infiniband/{vf.rdma.uverbs}": host.dev_path_exists(f"/dev/infiniband/{vf.rdma.uverbs}")
            for vf in info.vfs
            if vf.rdma and vf.rdma.uverbs
        }
        pfs.append(
            PfFacts(
                resource=m.resource,
                config=m.pf,
                info=info,
                eswitch_mode=mode,
                eswitch_checked=asked,
                gid_types=tuple(host.gid_types(info.rdma.name)) if info.rdma else (),
                vf_iommu_groups={vf.pci_address: host.iommu_group(vf.pci_address) for vf in info.vfs},
                dev_nodes=dev_nodes,
            )
        )
    agent, pod_resources = asyncio.run(_ask_services(settings))
    return NodeFacts(
        config=config,
        sysfs_root=settings.sysfs_root,
        dev_root=settings.dev_root,
        real_root=real,
        pf_problems=tuple(problems),
        pfs=tuple(pfs),
        modules={name: host.module_state(name, marker) for name, marker in BUILTIN_MARKERS.items()}
        if (host.sys / "module").is_dir()
        else None,
        iommus=tuple(host.iommus()),
        iommu_groups=len(host.iommu_groups()),
        netns=_netns(host, real),
        agent=agent,
        kube=_kube(settings, config, pod_resources),
        talos=_talos(settings, real),
    )


def _eswitch(reader: EswitchReader | None, address: str) -> tuple[str | None, bool]:
    if reader is None:
        return None, False
    try:
        return reader(address), True
    except (NetlinkOpError, OSError):
        return None, False


def _netns(host: SysfsHost, real: bool) -> NetnsFacts:
    param = host.module_param("ib_core", "netns_mode")
    from_param = {"Y": "shared", "N": "exclusive", "1": "shared", "0": "exclusive"}.get(param or "")
    if not real:
        where = f"{host.sys}/module/ib_core/parameters/netns_mode"
        if from_param is None:
            return NetnsFacts(
                None,
                f"not checked: simulated --sysfs-root and no {where} "
                "(RDMA netlink answers only for the real kernel)",
            )
        return NetnsFacts(
            from_param, f"{where}, simulated root (RDMA netlink answers only for the real kernel)"
        )
    try:
        mode = rdma_netlink.netns_mode()
    except rdma_netlink.RdmaNetlinkError as e:
        return NetnsFacts(None, str(e))
    cross = from_param if from_param is not None and from_param != mode else None
    return NetnsFacts(mode, "RDMA netlink (RDMA_NLDEV_CMD_SYS_GET)", cross)


async def _ask_services(settings: Settings) -> tuple[AgentFacts, tuple[str, int]]:
    """The running agent, and the kubelet's PodResources: (error or "", devices held by pods)."""
    agent = await _ask_agent(settings.health_address, settings.status_socket)
    try:
        owners = await PodResourcesClient(settings.pod_resources_socket).device_owners()
    except AgentError as e:
        return agent, (getattr(e, "reason", str(e)), 0)
    return agent, ("", len(owners))


async def _ask_agent(address: str, status_socket: str) -> AgentFacts:
    """grpc.health.v1 Check of "deviceplugin" at --health-address, then the status document (on the
    agent's --status-socket) for detail."""
    if not address:
        return AgentFacts(address="")
    try:
        host, port = split_address(address, "--health-address")
    except AgentError as e:
        return AgentFacts(address=address, error=str(e))
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"  # the agent listens everywhere; ask it locally (as `status` does)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            resp = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=DEVICEPLUGIN), timeout=3
            )
    except grpc.aio.AioRpcError as e:
        return AgentFacts(address=target, error=f"{e.code().name}: {e.details()}")
    serving = resp.status == health_pb2.HealthCheckResponse.SERVING
    try:
        doc = await fetch_status(status_socket, timeout=5)
    except AgentError:
        return AgentFacts(address=target, reachable=True, deviceplugin_serving=serving)
    advertised: dict[str, list[str]] = {r: [] for r in doc.get("registered", {})}
    for vf in doc.get("vfs", []):
        advertised.setdefault(vf["resource"], []).append(vf["vf"])
    return AgentFacts(
        address=target,
        reachable=True,
        deviceplugin_serving=serving,
        reason=doc.get("health", {}).get(DEVICEPLUGIN, {}).get("reason", ""),
        registered=dict(doc.get("registered", {})),
        advertised={r: tuple(ids) for r, ids in advertised.items()},
        allocated=frozenset(vf["vf"] for vf in doc.get("vfs", []) if vf.get("allocated")),
    )


def _kube(settings: Settings, config: Config, pod_resources: tuple[str, int]) -> KubeFacts:
    sock = os.path.join(settings.device_plugin_dir, KUBELET_SOCKET_NAME)
    try:
        state = "socket" if stat.S_ISSOCK(os.stat(sock).st_mode) else "not a socket"
    except OSError:
        state = "missing"
    writable, error = _writable_dir(Path(settings.devinfo_dir))
    pr_error, held = pod_resources
    prefixes = tuple(r.resource_name.replace("/", "-") + "-" for r in config.resources)
    files: dict[str, str] = {}
    d = Path(settings.devinfo_dir)
    for name in sorted(os.listdir(d)) if d.is_dir() else []:
        if name.startswith(prefixes) and name.endswith("-device.json"):
            try:
                files[name] = (d / name).read_text()
            except OSError as e:
                files[name] = f"unreadable: {e.strerror}"
    return KubeFacts(
        device_plugin_dir=settings.device_plugin_dir,
        kubelet_socket=sock,
        kubelet_socket_state=state,
        devinfo_dir=settings.devinfo_dir,
        devinfo_writable=writable,
        devinfo_error=error,
        pod_resources_socket=settings.pod_resources_socket,
        pod_resources_error=pr_error,
        pod_devices=held,
        devinfo_files=files,
    )


def _writable_dir(d: Path) -> tuple[bool, str]:
    """Can the agent write files here (or create it: the agent makes the directory at Allocate)?"""
    probe = d
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return False, f"{probe} is not a directory"
    if not os.access(probe, os.W_OK):
        m = mount_of(str(probe))
        ro = " (on a read-only mount)" if m is not None and m.read_only else ""
        return False, f"{probe} is not writable{ro}"
    return True, ""


def _talos(settings: Settings, real: bool) -> TalosFacts:
    root = Path(settings.sysfs_root)
    etc = root / "etc"
    ro: bool | None = None
    if real and etc.is_dir():
        m = mount_of(str(etc))
        ro = (m is not None and m.read_only) or not os.access(etc, os.W_OK)
    return TalosFacts(
        real_root=real,
        etc_path=str(etc),
        etc_read_only=ro,
        kernel_release=kernel_release() if real else None,
        write_paths={
            "--device-plugin-dir": settings.device_plugin_dir,
            "--devinfo-dir": settings.devinfo_dir,
        },
    )


def run_doctor(
    settings: Settings,
    as_json: bool = False,
    *,
    real_root: bool | None = None,
    eswitch: EswitchReader | None = None,
) -> tuple[int, str]:
    """(exit code, what to print). Exit 2 when the node could not be checked at all."""
    try:
        config = load_config(settings.config)
    except AgentError as e:
        return EXIT_CANNOT_CHECK, _cannot(str(e), as_json)
    if not (Path(settings.sysfs_root) / "sys").is_dir():
        return EXIT_CANNOT_CHECK, _cannot(
            f"--sysfs-root {settings.sysfs_root}: no sys/ directory there", as_json
        )
    checks = run_checks(gather(settings, config, real_root=real_root, eswitch=eswitch))
    if as_json:
        return exit_code(checks), json.dumps(document(checks), indent=2)
    return exit_code(checks), render(checks)


def _cannot(reason: str, as_json: bool) -> str:
    if as_json:
        return json.dumps({"checks": [], "error": reason, "exit_code": EXIT_CANNOT_CHECK}, indent=2)
    return f"sriov-rdma-agent doctor: cannot check this node: {reason}"
