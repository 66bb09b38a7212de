"""Plain frozen values describing what the agent sees on a node. No I/O here."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

PCI_ADDRESS_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")

# RDMA port state numbers as the kernel prints them in ports/N/state ("4: ACTIVE").
IB_PORT_ACTIVE = 4
# Physical port state 5 is "LinkUp" in ports/N/phys_state.
IB_PHYS_LINK_UP = 5


LINK_STATES = ("auto", "enable", "disable")  # IFLA_VF_LINK_STATE 0, 1, 2 (kernel uapi)


def is_pci_address(text: str) -> bool:
    return PCI_ADDRESS_RE.match(text) is not None


class Health(enum.Enum):
    """Device health in the kubelet's own words (deviceplugin constants.go)."""

    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


@dataclass(frozen=True)
class RdmaPort:
    """One port of an RDMA device, from /sys/class/infiniband/<dev>/ports/<n>/."""

    number: int
    state: int
    state_name: str
    phys_state: int
    phys_state_name: str
    link_layer: str
    rate: str

    @property
    def active(self) -> bool:
        return self.state == IB_PORT_ACTIVE


@dataclass(frozen=True)
class RdmaDevice:
    """An RDMA (verbs) device such as mlx5_4 and the char devices userspace needs."""

    name: str
    ports: tuple[RdmaPort, ...] = ()
    uverbs: str | None = None  # e.g. "uverbs4", from /sys/class/infiniband_verbs/uverbsN/ibdev
    umad: tuple[str, ...] = ()  # e.g. ("umad4",)
    issm: tuple[str, ...] = ()  # e.g. ("issm4",)
    node_guid: str = ""

    @property
    def all_ports_active(self) -> bool:
        return bool(self.ports) and all(p.active for p in self.ports)


@dataclass(frozen=True)
class NetdevInfo:
    """A network interface as sysfs shows it in the host network namespace."""

    name: str
    operstate: str  # "up", "down", "lowerlayerdown", "unknown", ...
    carrier: bool | None  # None when the kernel refuses to say (interface admin-down)
    mtu: int
    ifindex: int
    mac: str = ""
    speed_mbps: int | None = None  # None when unknown (-1) or link down


@dataclass(frozen=True)
class IommuGroup:
    """A PCI function's IOMMU group, from its ``iommu_group`` link into /sys/kernel/iommu_groups."""

    number: str  # the group directory's name: "12"
    name: str = ""  # the group's ``name`` file: "vfio-noiommu" for vfio's no-IOMMU groups, else absent


@dataclass(frozen=True)
class VfAttrs:
    """PF-side attributes of one VF as IFLA_VF_INFO reports them (None: the kernel did not say)."""

    index: int
    mac: str = ""
    trust: bool | None = None
    spoofchk: bool | None = None
    link_state: str | None = None  # one of LINK_STATES
    vlan: int = 0
    qos: int = 0
    min_tx_rate: int | None = None
    max_tx_rate: int | None = None


@dataclass(frozen=True)
class PfLink:
    """What rtnetlink says about a PF netdev: admin state, MTU and its VFs (IFLA_VFINFO_LIST)."""

    ifname: str
    ifindex: int
    mtu: int
    admin_up: bool
    vfs: tuple[VfAttrs, ...] = ()


@dataclass(frozen=True)
class VfInfo:
    """One virtual function. ``netdev`` is None when sriov-cni moved it into a pod: that is normal."""

    pci_address: str
    index: int  # N of physfn/virtfnN
    pf_pci_address: str
    vendor: str = ""
    device: str = ""
    driver: str | None = None  # None when unbound
    netdev: NetdevInfo | None = None
    rdma: RdmaDevice | None = None
    numa_node: int = -1  # -1: the platform reports no NUMA affinity
    error: str = ""  # why its sysfs files could not be read ("" when they could): it is Unhealthy
    iommu_group: IommuGroup | None = None  # None: no IOMMU (nor vfio's no-IOMMU mode) covers it
    attrs: VfAttrs | None = None  # PF-side attributes (rtnetlink); None when netlink was not asked


@dataclass(frozen=True)
class PfInfo:
    """A physical function and the VFs it currently has."""

    pci_address: str
    vendor: str
    device: str
    driver: str | None
    netdev: NetdevInfo | None
    numa_node: int
    sriov_totalvfs: int | None  # None: the device has no SR-IOV capability
    sriov_numvfs: int
    vfs: tuple[VfInfo, ...] = ()
    rdma: RdmaDevice | None = None
    sriov_drivers_autoprobe: bool | None = None
    eswitch_mode: str | None = None  # "legacy" / "switchdev" when devlink tells us
    admin_up: bool | None = None  # the netdev's IFF_UP (rtnetlink); None when netlink was not asked

    @property
    def sriov_capable(self) -> bool:
        return self.sriov_totalvfs is not None

    @property
    def name(self) -> str:
        """Human name for logs: the netdev if the PF has one, else its PCI address."""
        return self.netdev.name if self.netdev else self.pci_address


@dataclass(frozen=True)
class PciDevice:
    """The minimum discovery needs to pick PFs by vendor/device id."""

    pci_address: str
    vendor: str  # "15b3" (no 0x)
    device: str  # "1021"
    physfn: str | None  # set for VFs
    netdevs: tuple[str, ...] = ()
    error: str = ""  # why its sysfs files could not be read; its ids are then unknown ("")


@dataclass(frozen=True)
class DeviceStatus:
    """A VF as the kubelet sees it: its ID, health and why."""

    id: str
    health: Health
    numa_node: int
    pf_pci_address: str
    reason: str = ""  # empty when healthy; a short phrase otherwise ("PF enp1s0 has no carrier")


@dataclass(frozen=True)
class ResourceView:
    """Everything served for one extended resource at one moment."""

    resource_name: str
    devices: tuple[DeviceStatus, ...] = ()

    def by_id(self) -> dict[str, DeviceStatus]:
        return {d.id: d for d in self.devices}


@dataclass(frozen=True)
class DeviceSpecOut:
    """A host device node handed to a container (DeviceSpec in the kubelet API)."""

    host_path: str
    container_path: str
    permissions: str = "rw"


@dataclass(frozen=True)
class ContainerAllocation:
    """What Allocate returns for one container; the adapter turns it into protobuf."""

    envs: dict[str, str] = field(default_factory=dict)
    devices: tuple[DeviceSpecOut, ...] = ()
    devinfo: dict[str, str] = field(default_factory=dict)  # file name -> JSON content


class ReconcileState(enum.StrEnum):
    """Outcome of a PF's last reconcile. The values are the status JSON strings and the metric's
    ``state`` label values: operators' queries and scripts match them, so they never change."""

    OK = "ok"
    REFUSED = "refused"  # a change the agent will not make (say, a shrink under a VF a pod holds)
    ERROR = "error"
    EXTERNAL = "external"  # externally managed: checked, never written
    NOT_FOUND = "not_found"  # the config names a PF this node lacks
    HUNG = "hung"  # a kernel write has not returned

    @property
    def failing(self) -> bool:
        """Turns the "lifecycle" health service NOT_SERVING. A refusal is the agent keeping the node
        safe, so it is not failing."""
        return self in (ReconcileState.ERROR, ReconcileState.HUNG, ReconcileState.NOT_FOUND)


@dataclass(frozen=True)
class PfReconcileStatus:
    """The outcome of the last VF lifecycle reconcile of one configured PF (for status and metrics)."""

    pf: str  # PCI address, or the config selector when the PF was not found
    resource: str
    state: ReconcileState
    desired_vfs: int | None = None
    actual_vfs: int | None = None
    total_vfs: int | None = None
    eswitch_mode: str | None = None  # "legacy"/"switchdev"; None when devlink cannot tell
    reason: str = ""  # metric label of the refusal or error ("vf_in_use", "over_totalvfs", ...)
    message: str = ""
    actions_applied: int = 0
    updated_at: float = 0.0  # time.time() of the reconcile
