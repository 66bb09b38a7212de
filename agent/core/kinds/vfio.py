"""``deviceType: vfio-pci``: the whole VF, bound to vfio-pci, for userspace drivers (DPDK) and VMs
(KubeVirt). The pod gets the VFIO container (/dev/vfio/vfio) and the VF's group node.

As the community plugin's vfio info provider (``pkg/infoprovider/vfioInfoProvider.go``) and
``utils.GetVFIODeviceFile``: the group is the name of the VF's ``iommu_group`` link; in vfio's
no-IOMMU mode (the group's ``name`` is "vfio-noiommu") the host node is /dev/vfio/noiommu-<n>, handed
to the container as /dev/vfio/<n>.

Health (the community plugin has none): the VF must be bound to vfio-pci, have an IOMMU group whose
node exists, and its PF must have a driver. A VF bound to vfio-pci has no link of its own; the PF's
netdev is its uplink, so a PF with no carrier makes it Unhealthy. A PF without a netdev (not a NIC: an
NVMe controller, an accelerator) has no link to judge.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.core.health import pci_problem
from agent.core.kinds.base import DevExists, DeviceGrant
from agent.model import DeviceSpecOut, Health, IommuGroup, PfInfo, VfInfo

VFIO_DRIVER = "vfio-pci"
VFIO_CONTAINER = "/dev/vfio/vfio"
NOIOMMU_GROUP_NAME = "vfio-noiommu"


def vfio_group_paths(group: IommuGroup) -> tuple[str, str]:
    """(host path, container path) of a group's VFIO node."""
    container = f"/dev/vfio/{group.number}"
    if group.name == NOIOMMU_GROUP_NAME:
        return f"/dev/vfio/noiommu-{group.number}", container
    return container, container


@dataclass(frozen=True)
class Vfio:
    name: str = VFIO_DRIVER

    def health(self, pf: PfInfo, vf: VfInfo, in_pod: bool, dev_exists: DevExists) -> tuple[Health, str]:
        problem = pci_problem(vf)
        if problem:
            return Health.UNHEALTHY, problem
        if vf.driver != VFIO_DRIVER:
            bound = f"bound to {vf.driver}" if vf.driver else "not bound to a driver"
            return Health.UNHEALTHY, f"VF is {bound}, not {VFIO_DRIVER}"
        if vf.iommu_group is None:
            return Health.UNHEALTHY, "VF has no IOMMU group (no IOMMU, and vfio's no-IOMMU mode is off)"
        host, _ = vfio_group_paths(vf.iommu_group)
        for node in (VFIO_CONTAINER, host):
            if not dev_exists(node):
                return Health.UNHEALTHY, f"{node} does not exist"
        if pf.driver is None:
            return Health.UNHEALTHY, "PF has no driver bound"
        if pf.netdev is not None and pf.netdev.carrier is not True:
            state = "is admin-down" if pf.netdev.carrier is None else "has no carrier"
            return Health.UNHEALTHY, f"PF {pf.netdev.name} {state}"
        return Health.HEALTHY, ""

    def grant(self, vf: VfInfo, dev_exists: DevExists) -> DeviceGrant:
        """/dev/vfio/vfio, then the group's node; ``mount`` and ``dev-mount`` name their container paths."""
        env = {"mount": VFIO_CONTAINER}
        specs = [DeviceSpecOut(host_path=VFIO_CONTAINER, container_path=VFIO_CONTAINER)]
        if vf.iommu_group is not None:
            host, container = vfio_group_paths(vf.iommu_group)
            env["dev-mount"] = container
            specs.append(DeviceSpecOut(host_path=host, container_path=container))
        return DeviceGrant({"vfio": env}, tuple(specs))

    def devinfo_pci(self, vf: VfInfo) -> dict[str, str]:
        return {"pci-address": vf.pci_address}
