"""The VF lifecycle planner: desired PF state + observed node state -> the actions that close the gap.

Pure: plain dataclasses in, a tuple of frozen actions out; no I/O. The kernel's rules are encoded
here so the executor never has to guess:

* ``sriov_numvfs`` cannot go from one non-zero count to another (EBUSY): go through 0;
* a count above ``sriov_totalvfs`` is ERANGE: refused before writing, with the firmware hint;
* a PF without driver cannot configure SR-IOV (ENOENT): refused before writing;
* VFs allocated to running pods are never destroyed or renumbered, and their settings are not
  touched (sriov-cni owns a VF's MAC/VLAN while a pod holds it);
* externally managed PFs are never written, only checked.

VF-level actions need the VFs to exist, so a plan that changes the VF count ends with a wait;
the caller observes again and plans the next round. An empty plan means: nothing to write.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TypeVar

from agent.config import PfConfig
from agent.core.discovery import NO_PF_DRIVER, NO_SRIOV, sriov_blocker
from agent.model import PfInfo, VfAttrs, VfInfo

_T = TypeVar("_T")


# ---------------------------------------------------------------- desired
@dataclass(frozen=True)
class VfChange:
    """What to set on one VF through the PF; None fields are left alone."""

    mac: str | None = None
    trust: bool | None = None
    spoofchk: bool | None = None
    link_state: str | None = None
    vlan: int | None = None  # set together with qos (one IFLA_VF_VLAN)
    qos: int | None = None
    min_tx_rate: int | None = None  # set together with max_tx_rate (one IFLA_VF_RATE)
    max_tx_rate: int | None = None

    def items(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __bool__(self) -> bool:
        return bool(self.items())


@dataclass(frozen=True)
class PfDesired:
    pci_address: str
    resource: str
    config: PfConfig
    rdma: bool = True
    node_name: str = ""


@dataclass(frozen=True)
class Desired:
    pfs: tuple[PfDesired, ...]


@dataclass(frozen=True)
class Observed:
    """One read of the node (agent.services.node: sysfs, with rtnetlink's admin state, MTU and VF
    attributes and devlink's eswitch mode), the same one the kubelet's views are built from."""

    pfs: Mapping[str, PfInfo]
    in_use: frozenset[str] = frozenset()  # VF PCI addresses held by pods
    # Why pod holders are unknown ("" when known): PodResources is deployed but does not answer, so
    # any VF may be in a running pod and none is destroyed or reconfigured until it answers.
    holders_unknown: str = ""


# ---------------------------------------------------------------- actions
@dataclass(frozen=True)
class SetDriversAutoprobe:
    pf: str
    enabled: bool
    kind = "set_drivers_autoprobe"

    def describe(self) -> str:
        return f"{self.pf}: write {int(self.enabled)} to sriov_drivers_autoprobe"


@dataclass(frozen=True)
class SetNumVfs:
    pf: str
    count: int
    kind = "set_numvfs"

    def describe(self) -> str:
        return f"{self.pf}: write {self.count} to sriov_numvfs"


@dataclass(frozen=True)
class WaitForVfs:
    """Wait until ``count`` VFs exist (virtfnN + physfn) and, if ``probed``, have a driver and a device."""

    pf: str
    count: int
    probed: bool
    kind = "wait_vfs"

    def describe(self) -> str:
        what = "VFs bound and their netdev/RDMA devices present" if self.probed else "VF PCI functions"
        return f"{self.pf}: wait for {self.count} {what}"


@dataclass(frozen=True)
class SetMtu:
    pf: str
    ifname: str
    mtu: int
    vf: int | None = None  # None: the PF's own netdev
    kind = "set_mtu"

    def describe(self) -> str:
        who = "PF" if self.vf is None else f"VF {self.vf}"
        return f"{self.pf}: set MTU {self.mtu} on {who} netdev {self.ifname}"


@dataclass(frozen=True)
class SetLinkUp:
    pf: str
    ifname: str
    kind = "set_link_up"

    def describe(self) -> str:
        return f"{self.pf}: set PF netdev {self.ifname} admin up"


@dataclass(frozen=True)
class BindVfDriver:
    pf: str
    vf: int
    vf_pci: str
    driver: str
    current: str | None
    kind = "bind_vf_driver"

    def describe(self) -> str:
        return f"{self.pf}: VF {self.vf} ({self.vf_pci}) driver {self.current or 'none'} -> {self.driver}"


@dataclass(frozen=True)
class SetVfAttrs:
    pf: str
    ifname: str
    vf: int
    change: VfChange
    kind = "set_vf_attrs"

    def describe(self) -> str:
        what = " ".join(f"{k}={v}" for k, v in self.change.items().items())
        return f"{self.pf}: VF {self.vf} via {self.ifname}: {what}"


@dataclass(frozen=True)
class Refuse:
    """A change the agent will not make; the PF is left as it is and the reason is reported."""

    pf: str
    reason: str  # metric label: vf_in_use, holders_unknown, over_totalvfs, no_sriov, no_pf_driver
    message: str
    kind = "refuse"

    def describe(self) -> str:
        return f"{self.pf}: REFUSED ({self.reason}): {self.message}"


@dataclass(frozen=True)
class Warn:
    """Something worth telling an operator that does not stop the reconcile."""

    pf: str
    reason: str
    message: str
    kind = "warn"

    def describe(self) -> str:
        return f"{self.pf}: warning ({self.reason}): {self.message}"


Action = (SetDriversAutoprobe | SetNumVfs | WaitForVfs | SetMtu | SetLinkUp | BindVfDriver | SetVfAttrs
          | Refuse | Warn)


def mutates(action: Action) -> bool:
    """Does applying this action write to the node?"""
    return not isinstance(action, Refuse | Warn | WaitForVfs)


# ---------------------------------------------------------------- planning
def plan(desired: Desired, observed: Observed) -> tuple[Action, ...]:
    """Every action needed now, PF by PF, in the order they must run."""
    out: list[Action] = []
    for want in desired.pfs:
        have = observed.pfs.get(want.pci_address)
        if have is None:
            continue  # not on the node: discovery reports it
        out.extend(_plan_pf(want, have, observed.in_use, observed.holders_unknown))
    return tuple(out)


def _plan_pf(want: PfDesired, have: PfInfo, in_use: frozenset[str], unknown: str = "") -> list[Action]:
    cfg = want.config
    pf = want.pci_address
    out: list[Action] = []
    if have.eswitch_mode == "switchdev" and want.rdma:
        out.append(Warn(pf, "eswitch_switchdev",
                        f"eswitch mode is switchdev; mlx5 RDMA VFs need legacy "
                        f"(devlink dev eswitch set pci/{pf} mode legacy)"))
    if cfg.externally_managed:
        return out + _check_external(want, have)
    target = cfg.num_vfs or 0
    numvfs, total, blocker = have.sriov_numvfs, have.sriov_totalvfs, sriov_blocker(have)
    if blocker == NO_SRIOV or total is None:  # one condition (the second spells it out for mypy)
        return [*out, Refuse(pf, NO_SRIOV,
                             "the device has no SR-IOV capability (no sriov_totalvfs); enable SR-IOV in "
                             f"firmware (mstconfig -d {pf} set SRIOV_EN=1 NUM_OF_VFS={target}) and BIOS, "
                             "then reboot")]
    busy = sorted(v.pci_address for v in have.vfs if v.pci_address in in_use)
    if target != numvfs:
        if target > total:
            return [*out, Refuse(pf, "over_totalvfs", over_total_message(pf, target, total))]
        if blocker == NO_PF_DRIVER:
            return [*out, Refuse(pf, NO_PF_DRIVER,
                                 "no driver is bound to the PF, so the kernel cannot create VFs (ENOENT); "
                                 "load mlx5_core and bind it to the PF")]
        if busy:
            return [*out, Refuse(pf, "vf_in_use",
                                 f"changing numVfs {numvfs} -> {target} would destroy VFs held by "
                                 f"running pods: {', '.join(busy)}; kept {numvfs} VFs")]
        if unknown and numvfs:
            return [*out, Refuse(pf, "holders_unknown",
                                 f"changing numVfs {numvfs} -> {target} destroys every VF of the PF, "
                                 f"and which of them running pods hold is unknown ({unknown}); kept "
                                 f"{numvfs} VFs until PodResources answers")]
    out.extend(_plan_pf_netdev(want, have))
    autoprobe_now = have.sriov_drivers_autoprobe
    if target != numvfs:
        if cfg.drivers_autoprobe is not None and cfg.drivers_autoprobe != autoprobe_now:
            out.append(SetDriversAutoprobe(pf, cfg.drivers_autoprobe))
        if numvfs:
            out.append(SetNumVfs(pf, 0))
        if target:
            autoprobe = cfg.drivers_autoprobe if cfg.drivers_autoprobe is not None else autoprobe_now
            out.append(SetNumVfs(pf, target))
            out.append(WaitForVfs(pf, target, probed=autoprobe is not False))
        return out  # VF-level settings once the VFs exist: the next round
    if cfg.drivers_autoprobe is not None and cfg.drivers_autoprobe != autoprobe_now:
        out.append(SetDriversAutoprobe(pf, cfg.drivers_autoprobe))
    deferred = []
    for vf in have.vfs:
        if vf.pci_address in in_use or unknown:
            actions = _plan_vf(want, have, vf)
            if actions:
                deferred.append(vf.pci_address)
            continue
        out.extend(_plan_vf(want, have, vf))
    if deferred and unknown:
        out.append(Warn(pf, "holders_unknown",
                        f"VF settings are left alone while it is unknown which VFs pods hold ({unknown}): "
                        f"{', '.join(deferred)}"))
    elif deferred:
        out.append(Warn(pf, "vf_in_use",
                        f"settings of VFs held by pods are left alone until released: {', '.join(deferred)}"))
    return out


def _plan_pf_netdev(want: PfDesired, have: PfInfo) -> list[Action]:
    out: list[Action] = []
    if have.netdev is None:
        return out
    ifname = have.netdev.name
    if want.config.mtu is not None and want.config.mtu != have.netdev.mtu:
        out.append(SetMtu(want.pci_address, ifname, want.config.mtu))
    if have.admin_up is False and (want.config.num_vfs or 0) > 0:
        out.append(SetLinkUp(want.pci_address, ifname))
    return out


def _plan_vf(want: PfDesired, have: PfInfo, vf: VfInfo) -> list[Action]:
    cfg = want.config
    pf = want.pci_address
    out: list[Action] = []
    if cfg.vf_driver is not None and vf.driver != cfg.vf_driver:
        out.append(BindVfDriver(pf, vf.index, vf.pci_address, cfg.vf_driver, vf.driver))
    if have.netdev is not None:
        change = vf_change(want, vf)
        if change:
            out.append(SetVfAttrs(pf, have.netdev.name, vf.index, change))
    if cfg.vf.mtu is not None and vf.netdev is not None and vf.netdev.mtu != cfg.vf.mtu \
            and (cfg.vf_driver is None or vf.driver == cfg.vf_driver):
        out.append(SetMtu(pf, vf.netdev.name, cfg.vf.mtu, vf=vf.index))
    return out


def vf_change(want: PfDesired, vf: VfInfo) -> VfChange:
    """The PF-side VF attributes that differ from the config (all of them when unknown)."""
    s = want.config.vf
    a = vf.attrs or VfAttrs(vf.index)
    known = vf.attrs is not None
    mac = stable_mac(want.node_name, want.pci_address, vf.index) if s.mac == "stable" else None
    vlan = qos = None
    if s.vlan is not None and (not known or (a.vlan, a.qos) != (s.vlan, s.qos or 0)):
        vlan, qos = s.vlan, s.qos or 0
    min_rate = max_rate = None
    if s.min_tx_rate is not None or s.max_tx_rate is not None:
        want_min = s.min_tx_rate if s.min_tx_rate is not None else (a.min_tx_rate or 0)
        want_max = s.max_tx_rate if s.max_tx_rate is not None else (a.max_tx_rate or 0)
        if not known or (a.min_tx_rate, a.max_tx_rate) != (want_min, want_max):
            min_rate, max_rate = want_min, want_max
    return VfChange(
        mac=mac if mac is not None and (not known or a.mac.lower() != mac) else None,
        trust=_differs(s.trust, a.trust, known),
        spoofchk=_differs(s.spoofchk, a.spoofchk, known),
        link_state=_differs(s.link_state, a.link_state, known),
        vlan=vlan, qos=qos, min_tx_rate=min_rate, max_tx_rate=max_rate,
    )


def _differs(want: _T | None, have: _T | None, known: bool) -> _T | None:
    return want if want is not None and (not known or want != have) else None


def _check_external(want: PfDesired, have: PfInfo) -> list[Action]:
    """Externally managed: never written; say where the node differs from what the config expects."""
    pf = want.pci_address
    cfg = want.config
    out: list[Action] = []
    if cfg.num_vfs is not None and cfg.num_vfs > have.sriov_numvfs:
        out.append(Warn(pf, "externally_managed_mismatch",
                        f"externally managed: numVfs {cfg.num_vfs} expected but the PF has "
                        f"{have.sriov_numvfs}; the agent does not write it"))
    if cfg.mtu is not None and have.netdev is not None and cfg.mtu > have.netdev.mtu:
        out.append(Warn(pf, "externally_managed_mismatch",
                        f"externally managed: MTU {cfg.mtu} expected but the PF has {have.netdev.mtu}"))
    return out


def over_total_message(pf: str, wanted: int, total: int) -> str:
    return (f"numVfs {wanted} is above sriov_totalvfs {total} (ERANGE): the firmware limit. Raise it with "
            f"`mstconfig -d {pf} set SRIOV_EN=1 NUM_OF_VFS={wanted}` and reboot the node; "
            "the agent does not change firmware")


def stable_mac(node_name: str, pf_pci: str, index: int) -> str:
    """A locally administered unicast MAC that depends only on node, PF and VF index."""
    digest = bytearray(hashlib.sha256(f"{node_name}/{pf_pci}/{index}".encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in digest)


def format_plan(actions: tuple[Action, ...]) -> str:
    """`serve --dry-run`'s output."""
    if not actions:
        return "Plan: nothing to change (the node is in the desired state)."
    lines = ["Plan (dry run, nothing written):"]
    lines += [f"  {i}. {a.describe()}" for i, a in enumerate(actions, 1)]
    if any(isinstance(a, SetNumVfs) for a in actions):
        lines.append("  VF settings (driver, MAC, trust, ...) are planned once the new VFs exist.")
    return "\n".join(lines)
