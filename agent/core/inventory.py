"""Resource views, Allocate responses and preferred allocations, computed from plain data."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from agent.config import ResourceConfig
from agent.core.health import vf_health
from agent.errors import AllocationError
from agent.model import (
    ContainerAllocation,
    DeviceSpecOut,
    DeviceStatus,
    Health,
    PfInfo,
    ResourceView,
    VfInfo,
)

DEVINFO_VERSION = "1.1.0"  # k8snetworkplumbingwg device-info-spec
RDMA_CM = "/dev/infiniband/rdma_cm"


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


def build_view(resource: ResourceConfig, pfs: Sequence[PfInfo], in_pod: Collection[str] = ()) -> ResourceView:
    """All VFs of the resource's PFs, each with its health; IDs are VF PCI addresses."""
    devices = []
    for pf in pfs:
        for vf in pf.vfs:
            health, reason = vf_health(pf, vf, resource.rdma, vf.pci_address in in_pod)
            devices.append(DeviceStatus(vf.pci_address, health, vf.numa_node, pf.pci_address, reason))
    return ResourceView(resource.resource_name, tuple(sorted(devices, key=lambda d: d.id)))


def allocate(resource: ResourceConfig, ids: Sequence[str], view: ResourceView, node: NodeState,
             dev_exists: Callable[[str], bool]) -> ContainerAllocation:
    """The container response the community SR-IOV device plugin gives, for the same IDs.

    Env PCIDEVICE_<RES> lists the IDs in request order; <...>_INFO maps each to its generic and
    rdma info (keys sorted, as Go's encoding/json does); device specs cover each VF's RDMA char
    devices that exist on the host plus rdma_cm, de-duplicated by host path.
    """
    if not ids:
        raise AllocationError("<none>", "the request names no devices")
    known = view.by_id()
    info: dict[str, dict[str, dict[str, str]]] = {}
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
        entry: dict[str, dict[str, str]] = {"generic": {"deviceID": dev_id}}
        if resource.rdma and vf.rdma is not None:
            rdma_env: dict[str, str] = {"rdma_dev": vf.rdma.name}
            paths = [
                *((f"/dev/infiniband/{n}", "issm") for n in vf.rdma.issm),
                *((f"/dev/infiniband/{n}", "umad") for n in vf.rdma.umad),
                *([(f"/dev/infiniband/{vf.rdma.uverbs}", "uverbs")] if vf.rdma.uverbs else []),
                (RDMA_CM, "rdma_cm"),
            ]
            for path, key in paths:
                if dev_exists(path):
                    rdma_env.setdefault(key, path)
                    specs.setdefault(path, DeviceSpecOut(host_path=path, container_path=path))
            entry["rdma"] = rdma_env
        info[dev_id] = entry
        devinfo[devinfo_file_name(resource.resource_name, dev_id)] = devinfo_content(resource, vf)
    envs = {
        resource.env_name: ",".join(ids),
        resource.env_name + "_INFO": json.dumps(info, sort_keys=True, separators=(",", ":")),
    }
    return ContainerAllocation(envs=envs, devices=tuple(specs.values()), devinfo=devinfo)


def devinfo_file_name(resource_name: str, device_id: str) -> str:
    """<resource with / as ->-<id>-device.json, the name Multus looks up."""
    return f"{resource_name.replace('/', '-')}-{device_id.replace('/', '-')}-device.json"


def devinfo_content(resource: ResourceConfig, vf: VfInfo) -> str:
    """A VF's device-info file (device-info-spec 1.1.0), as the community plugin writes it."""
    pci_info = {"pci-address": vf.pci_address}
    if resource.rdma and vf.rdma is not None:
        pci_info["rdma-device"] = vf.rdma.name
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
    """
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
