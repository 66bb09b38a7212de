"""Device health as a pure function of the latest observations, plus flap damping.

Three inputs meet here: sysfs (PCI function, driver, RDMA device and port state), netlink (the
link state of every netdev, which is fresher than a sysfs read and the only source that pushes
changes) and the agent's allocations (a VF in a pod has no host netdev, which is normal). The
debounce is a fold over successive views with the clock passed in, so it is tested without time.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace

from agent.model import DeviceStatus, Health, NetdevInfo, PfInfo, ResourceView, VfInfo

# A device that recovered must stay healthy this long before the kubelet hears "Healthy" again.
DEFAULT_SETTLE_S = 2.0


@dataclass(frozen=True)
class LinkObservation:
    """What RTM_NEWLINK last said about one netdev."""

    name: str
    ifindex: int
    admin_up: bool  # IFF_UP
    carrier: bool  # IFLA_CARRIER
    operstate: str  # lower case, as sysfs prints it: "up", "down", "lowerlayerdown", ...
    parent_bus: str = ""  # IFLA_PARENT_DEV_BUS_NAME: "pci" for PF/VF netdevs, "" for virtual ones

    def as_netdev(self, base: NetdevInfo) -> NetdevInfo:
        """``base`` (read from sysfs) with the link state netlink reported.

        Carrier is None while the interface is admin-down, matching sysfs, which refuses to say.
        """
        return replace(base, operstate=self.operstate, carrier=self.carrier if self.admin_up else None)


def with_links(pf: PfInfo, links: Mapping[str, LinkObservation]) -> PfInfo:
    """The PF and its VFs with netlink's word on link state over what sysfs said.

    Only netdevs netlink has reported are touched; presence still comes from sysfs, which is
    re-read on every netlink add/remove/rename event.
    """
    def link(nd: NetdevInfo | None) -> NetdevInfo | None:
        obs = links.get(nd.name) if nd is not None else None
        return obs.as_netdev(nd) if nd is not None and obs is not None else nd

    vfs = tuple(replace(vf, netdev=link(vf.netdev)) if vf.netdev and vf.netdev.name in links else vf
                for vf in pf.vfs)
    return replace(pf, netdev=link(pf.netdev), vfs=vfs)


def link_matters(before: LinkObservation | None, after: LinkObservation | None,
                 watched: Collection[str]) -> bool:
    """Does this link change concern a device we serve?

    A node creates and deletes a veth for every pod; those must not cost a rescan. PF and VF
    netdevs sit on the PCI bus; the rest matter only if their name (old or new) is one we watch.
    """
    if before == after:
        return False
    for obs in (before, after):
        if obs is not None and (obs.parent_bus == "pci" or obs.name in watched):
            return True
    return False


def link_state_only(before: LinkObservation | None, after: LinkObservation | None) -> bool:
    """Only admin state, carrier or operstate changed: the same netdev, nothing for sysfs to add."""
    return (before is not None and after is not None and before.name == after.name
            and before.parent_bus == after.parent_bus)


GONE = "VF PCI device is gone"


def pci_gone(vf: VfInfo) -> bool:
    """The PF still links virtfnN to this address but the PCI function is no longer there."""
    return not vf.vendor and not vf.device and vf.driver is None


def pci_problem(vf: VfInfo) -> str:
    """Why the VF's PCI function is of no use whatever its kind ("" when it is there and readable)."""
    if vf.error:
        return f"cannot read the VF from sysfs: {vf.error}"
    return GONE if pci_gone(vf) else ""


def vf_health(pf: PfInfo, vf: VfInfo, rdma_required: bool, in_pod: bool = False) -> tuple[Health, str]:
    """Healthy, or Unhealthy with the first reason that makes the VF useless to a pod: the rule of
    the netdevice kind (agent/core/kinds/netdevice.py).

    A VF whose netdev (or RDMA device, in exclusive netns mode) left the host because it is in
    a pod is not unhealthy: ``in_pod`` says the VF is allocated, so its absence is expected.
    """
    problem = pci_problem(vf)
    if problem:
        return Health.UNHEALTHY, problem
    if vf.driver is None:
        return Health.UNHEALTHY, "VF has no driver bound"
    if pf.driver is None:
        return Health.UNHEALTHY, "PF has no driver bound"
    if pf.netdev is None:
        return Health.UNHEALTHY, "PF has no network interface"
    if pf.netdev.carrier is not True:
        state = "is admin-down" if pf.netdev.carrier is None else "has no carrier"
        return Health.UNHEALTHY, f"PF {pf.netdev.name} {state}"
    if rdma_required:
        if pf.rdma is not None and not pf.rdma.all_ports_active:
            port = next(p for p in pf.rdma.ports if not p.active) if pf.rdma.ports else None
            state = f"{port.state}: {port.state_name}" if port else "no ports"
            return Health.UNHEALTHY, f"PF RDMA device {pf.rdma.name} port not ACTIVE ({state})"
        if vf.rdma is None and not in_pod:
            return Health.UNHEALTHY, "VF has no RDMA device"
        if vf.rdma is not None and vf.rdma.ports and not vf.rdma.all_ports_active:
            return Health.UNHEALTHY, f"VF RDMA device {vf.rdma.name} port not ACTIVE"
    return Health.HEALTHY, ""


@dataclass(frozen=True)
class Track:
    """One device's debounce record: what was reported, and what was last observed since when."""

    reported: Health
    reason: str  # the reason reported with an Unhealthy state
    observed: Health
    observed_since: float
    device: DeviceStatus  # as last observed (NUMA node, PF), to keep reporting a vanished device


@dataclass(frozen=True)
class Debounce:
    """Per-resource debounce state. ``settle_s`` is the hold time before a recovery is reported."""

    settle_s: float = DEFAULT_SETTLE_S
    tracks: Mapping[str, Track] = field(default_factory=dict)

    def next_deadline(self) -> float | None:
        """When a pending recovery becomes reportable (None: nothing pending)."""
        pending = [t.observed_since + self.settle_s for t in self.tracks.values()
                   if t.observed is Health.HEALTHY and t.reported is Health.UNHEALTHY]
        return min(pending) if pending else None


def fold(state: Debounce, observed: ResourceView, now: float,
         held: Collection[str] = ()) -> tuple[Debounce, ResourceView, tuple[str, ...]]:
    """Apply one observation; return the new state, the view to report and the IDs whose health flipped.

    Unhealthy is reported at once: a dead link must stop new allocations now. Healthy is reported
    only once the device has been observed healthy for ``settle_s`` without interruption, so a
    flapping cable does not make the kubelet's allocatable count oscillate. A device seen for the
    first time is reported as observed: there is no history to damp.

    A device that vanished (hot-unplug) while a pod holds it (``held``) stays listed as Unhealthy,
    so the kubelet shows the pod its device failed instead of silently forgetting it; one that
    nobody holds is dropped.
    """
    seen = {d.id for d in observed.devices}
    ghosts = [replace(t.device, health=Health.UNHEALTHY, reason=GONE)
              for dev_id, t in state.tracks.items() if dev_id not in seen and dev_id in held]
    tracks: dict[str, Track] = {}
    out: list[DeviceStatus] = []
    flipped: list[str] = []
    for dev in sorted((*observed.devices, *ghosts), key=lambda d: d.id):
        old = state.tracks.get(dev.id)
        if old is None:
            track = Track(dev.health, dev.reason, dev.health, now, dev)
        else:
            since = old.observed_since if old.observed is dev.health else now
            if dev.health is Health.UNHEALTHY:
                track = Track(Health.UNHEALTHY, dev.reason, dev.health, since, dev)
            elif old.reported is Health.UNHEALTHY and now < since + state.settle_s:
                track = Track(Health.UNHEALTHY, old.reason, dev.health, since, dev)
            else:
                track = Track(Health.HEALTHY, "", dev.health, since, dev)
            if track.reported is not old.reported:
                flipped.append(dev.id)
        tracks[dev.id] = track
        out.append(replace(dev, health=track.reported, reason=track.reason))
    return (Debounce(state.settle_s, tracks), ResourceView(observed.resource_name, tuple(out)),
            tuple(flipped))
