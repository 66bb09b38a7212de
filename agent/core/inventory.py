"""Resource views, Allocate responses and preferred allocations, computed from plain data."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from agent.config import ResourceConfig
from agent.core.kinds import DevExists, kind_of
from agent.errors import AllocationError
from agent.model import (
    ContainerAllocation,
    DeviceSpecOut,
    DeviceStatus,
    Health,
    PfInfo,
    PfLink,
    ResourceView,
    VfInfo,
)

DEVINFO_VERSION = "1.1.0"  # k8snetworkplumbingwg device-info-spec
NCCL_IB_HCA = "NCCL_IB_HCA"

# Bounds on what a device-plugin client may send. Our IDs are PCI addresses (12 characters); the kubelet
# sends one container request per Allocate and at most every device of the resource in a list.
MAX_DEVICE_ID_CHARS = 64
MAX_REQUEST_IDS = 4096
MAX_CONTAINER_REQUESTS = 64


@dataclass(frozen=True)
class NodeState:
    """The PFs (with their VFs) currently observed, keyed by PF PCI address."""

    pfs: Mapping[str, PfInfo]

    def vf(self, address: str) -> tuple[PfInfo, VfInfo] | None:
        for pf in self.pfs.values():
            for vf in pf.vfs:
                if vf.pci_address == address:
                    return pf, vf
        return None


def with_netlink(pf: PfInfo, link: PfLink | None, eswitch_mode: str | None) -> PfInfo:
    """The PF as sysfs showed it, with what rtnetlink and devlink add for the reconcile: admin state, the
    kernel's MTU, each VF's PF-side attributes (None when netlink could not say), the eswitch mode."""
    attrs = {a.index: a for a in link.vfs} if link is not None else {}
    netdev = pf.netdev
    if link is not None and netdev is not None:
        netdev = replace(netdev, mtu=link.mtu)
    vfs = tuple(replace(vf, attrs=attrs.get(vf.index)) for vf in pf.vfs)
    return replace(pf, netdev=netdev, admin_up=link.admin_up if link is not None else None,
                   eswitch_mode=eswitch_mode, vfs=vfs)


def build_view(resource: ResourceConfig, pfs: Sequence[PfInfo], in_pod: Collection[str],
               dev_exists: DevExists) -> ResourceView:
    """All VFs of the resource's PFs, each with its health as the resource's device kind judges it;
    IDs are VF PCI addresses. ``dev_exists`` answers for the /dev nodes a kind checks (vfio-pci)."""
    kind = kind_of(resource)
    devices = []
    for pf in pfs:
        for vf in pf.vfs:
            health, reason = kind.health(pf, vf, vf.pci_address in in_pod, dev_exists)
            devices.append(DeviceStatus(vf.pci_address, health, vf.numa_node, pf.pci_address, reason))
    return ResourceView(resource.resource_name, tuple(sorted(devices, key=lambda d: d.id)))


def check_ids(ids: Sequence[str], field: str, *, unique: bool) -> None:
    """Refuse a list of device IDs no kubelet sends: too many, too long, or (``unique``) repeated."""
    if len(ids) > MAX_REQUEST_IDS:
        raise AllocationError(f"<{len(ids)} IDs>", f"{field}: at most {MAX_REQUEST_IDS} device IDs")
    seen: set[str] = set()
    for dev_id in ids:
        if len(dev_id) > MAX_DEVICE_ID_CHARS:
            raise AllocationError(dev_id, f"{field}: a device ID is at most {MAX_DEVICE_ID_CHARS} characters")
        if unique and dev_id in seen:
            raise AllocationError(dev_id, f"{field}: named more than once")
        seen.add(dev_id)


def allocate_all(resource: ResourceConfig, requests: Sequence[Sequence[str]], view: ResourceView,
                 node: NodeState, dev_exists: Callable[[str], bool]) -> list[ContainerAllocation]:
    """Every container request of one Allocate call, or AllocationError for the first bad one.

    Pure, so the caller writes device-info files and records allocations only once the whole call is
    known to succeed. A VF goes to one container: naming it in two requests of one call is refused.
    """
    if len(requests) > MAX_CONTAINER_REQUESTS:
        raise AllocationError(f"<{len(requests)} requests>",
                              f"at most {MAX_CONTAINER_REQUESTS} container requests in one call")
    for ids in requests:
        check_ids(ids, "devices_ids", unique=True)
    check_ids([i for ids in requests for i in ids], "devices_ids of all container requests", unique=True)
    return [allocate(resource, ids, view, node, dev_exists) for ids in requests]


def allocate(resource: ResourceConfig, ids: Sequence[str], view: ResourceView, node: NodeState,
             dev_exists: Callable[[str], bool]) -> ContainerAllocation:
    """The container response the community SR-IOV device plugin gives, for the same IDs.

    Env PCIDEVICE_<RES> lists the IDs in request order; <...>_INFO maps each to its generic info and
    what its device kind adds (keys sorted, as Go's encoding/json does); device specs are each VF's,
    from its kind (RDMA char devices that exist on the host plus rdma_cm; or /dev/vfio/vfio and the
    VF's group), de-duplicated by host path.

    With ``ncclHints`` (off by default, so parity holds) NCCL_IB_HCA="=<rdma devs>" is added: in the
    RDMA subsystem's shared netns mode a pod sees every HCA of the node, and NCCL's exact-match
    syntax (leading "=") keeps it on the ones this container was given.
    """
    if not ids:
        raise AllocationError("<none>", "the request names no devices")
    check_ids(ids, "devices_ids", unique=True)
    kind = kind_of(resource)
    known = view.by_id()
    info: dict[str, dict[str, Mapping[str, str]]] = {}
    hcas: list[str] = []
    specs: dict[str, DeviceSpecOut] = {}
    devinfo: dict[str, str] = {}
    for dev_id in ids:
        status = known.get(dev_id)
        if status is None:
            raise AllocationError(dev_id, f"not a device of {resource.resource_name}")
        if status.health is not Health.HEALTHY:
            raise AllocationError(dev_id, f"unhealthy: {status.reason}")
        found = node.vf(dev_id)
        if found is None:
            raise AllocationError(dev_id, "VF vanished from sysfs")
        _, vf = found
        grant = kind.grant(vf, dev_exists)
        info[dev_id] = {"generic": {"deviceID": dev_id}, **grant.info}
        for spec in grant.specs:
            specs.setdefault(spec.host_path, spec)
        if "rdma" in grant.info:
            hcas.append(grant.info["rdma"]["rdma_dev"])
        devinfo[devinfo_file_name(resource.resource_name, dev_id)] = devinfo_content(resource, vf)
    envs = {
        resource.env_name: ",".join(ids),
        resource.env_name + "_INFO": json.dumps(info, sort_keys=True, separators=(",", ":")),
    }
    if resource.nccl_hints and hcas:
        envs[NCCL_IB_HCA] = "=" + ",".join(dict.fromkeys(hcas))
    return ContainerAllocation(envs=envs, devices=tuple(specs.values()), devinfo=devinfo)


def devinfo_file_name(resource_name: str, device_id: str) -> str:
    """<resource with / as ->-<id>-device.json, the name Multus looks up."""
    return f"{resource_name.replace('/', '-')}-{device_id.replace('/', '-')}-device.json"


def devinfo_content(resource: ResourceConfig, vf: VfInfo) -> str:
    """A VF's device-info file (device-info-spec 1.1.0), as the community plugin writes it."""
    pci_info = kind_of(resource).devinfo_pci(vf)
    return json.dumps({"type": "pci", "version": DEVINFO_VERSION, "pci": pci_info}, separators=(",", ":"))


def devinfo_files(resource: ResourceConfig, view: ResourceView, node: NodeState) -> dict[str, str]:
    """File name -> content for every VF the resource serves (its view, unhealthy ones included)."""
    vfs = {vf.pci_address: vf for pf in node.pfs.values() for vf in pf.vfs}
    return {devinfo_file_name(resource.resource_name, d.id): devinfo_content(resource, vfs[d.id])
            for d in view.devices if d.id in vfs}


_PCI_ADDRESS = r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]"


def devinfo_owner(resource_names: Collection[str]) -> Callable[[str], bool]:
    """Which file names in the device-info directory are ours: a VF's file of one of our resources.
    Files of any other resource (another device plugin's) are never ours to touch."""
    prefixes = "|".join(re.escape(n.replace("/", "-")) for n in sorted(resource_names))
    pattern = re.compile(rf"(?:{prefixes})-{_PCI_ADDRESS}-device\.json") if prefixes else None
    return lambda name: pattern is not None and pattern.fullmatch(name) is not None


def preferred_allocation(available: Sequence[str], must_include: Sequence[str], size: int,
                         view: ResourceView) -> list[str]:
    """Pick ``size`` IDs: every must_include first, then the same NUMA node, then the same PF.

    With nothing forced, start from the smallest (NUMA, PF) group that can hold the whole
    request, so multi-VF pods land on one PF and large groups stay whole for later requests.
    The answer is always a subset of ``available``: the kubelet passes must_include as part of it
    (its reusable devices), so a must_include outside it is a malformed request, refused.
    """
    check_ids(available, "available_deviceIDs", unique=False)
    check_ids(must_include, "must_include_deviceIDs", unique=False)
    offered = set(available)
    for dev_id in must_include:
        if dev_id not in offered:
            raise AllocationError(dev_id, "in must_include_deviceIDs but not in available_deviceIDs")
    by_id = view.by_id()
    chosen = [i for i in dict.fromkeys(must_include)][:max(size, 0)]
    pool = [i for i in dict.fromkeys(available) if i not in chosen and i in by_id]

    def key_of(i: str) -> tuple[int, str]:
        d = by_id[i]
        return d.numa_node, d.pf_pci_address

    if not chosen and pool and size > 0:
        groups: dict[tuple[int, str], int] = {}
        for i in pool:
            groups[key_of(i)] = groups.get(key_of(i), 0) + 1
        fitting = [g for g, n in groups.items() if n >= size]
        # The tightest group that fits keeps big groups whole; with none, the biggest one.
        anchor = (min(fitting, key=lambda g: (groups[g], g)) if fitting
                  else max(groups, key=lambda g: (groups[g], g)))
        anchors = {anchor}
    else:
        anchors = {key_of(i) for i in chosen if i in by_id}
    numas = {a[0] for a in anchors}
    pfs = {a[1] for a in anchors}
    rest = sorted(pool, key=lambda i: (by_id[i].numa_node not in numas,
                                       by_id[i].pf_pci_address not in pfs, i))
    return chosen + rest[: max(size - len(chosen), 0)]
