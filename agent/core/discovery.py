"""Which PFs the config names, decided from plain listings of the host (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.config import Config, PfConfig, ResourceConfig
from agent.model import PciDevice, PfInfo


@dataclass(frozen=True)
class PfMatch:
    resource: ResourceConfig
    pf: PfConfig
    pci_address: str


@dataclass(frozen=True)
class Resolution:
    matches: tuple[PfMatch, ...]
    problems: tuple[str, ...]  # one sentence per selector that matched nothing or clashed

    def for_resource(self, name: str) -> tuple[PfMatch, ...]:
        return tuple(m for m in self.matches if m.resource.resource_name == name)


def resolve_pfs(config: Config, pci: Sequence[PciDevice],
                netdev_owner: Mapping[str, str | None]) -> Resolution:
    """Map every PF selector to PCI addresses.

    ``netdev_owner`` maps each configured pfName to the PCI address behind it (None when the
    interface does not exist). A PF claimed twice (say by name and by vendor id) keeps its
    first claim; the second is reported, never silently merged. A selector that matches
    nothing is a problem for its own entry only: every other PF is still served.
    """
    by_addr = {d.pci_address: d for d in pci}
    claimed: dict[str, str] = {}
    matches: list[PfMatch] = []
    problems: list[str] = []
    for res, pf in config.all_pfs():
        sel = pf.selector
        where = f"{res.resource_name}: PF {sel.describe()}"
        if sel.pf_name is not None:
            owner = netdev_owner.get(sel.pf_name)
            if owner is None:
                problems.append(f"{where}: no such network interface on this node")
                continue
            addrs = [owner]
        elif sel.pci_address is not None:
            if sel.pci_address not in by_addr:
                problems.append(f"{where}: no such PCI device on this node")
                continue
            addrs = [sel.pci_address]
        else:
            # A device whose ids could not be read matches no id; it is reported if named otherwise.
            addrs = [d.pci_address for d in pci
                     if d.vendor == sel.vendor and d.device == sel.device and d.physfn is None
                     and not d.error]
            if not addrs:
                problems.append(f"{where}: no physical function with that id")
                continue
        for addr in addrs:
            dev = by_addr.get(addr)
            if dev is not None and dev.error:
                problems.append(f"{where}: {addr} cannot be read: {dev.error}")
                continue
            if dev is not None and dev.physfn is not None:
                problems.append(f"{where}: {addr} is a VF of {dev.physfn}, not a PF")
                continue
            if addr in claimed:
                problems.append(f"{where}: {addr} is already used by {claimed[addr]}")
                continue
            claimed[addr] = f"{res.resource_name} ({sel.describe()})"
            matches.append(PfMatch(res, pf, addr))
    return Resolution(tuple(matches), tuple(problems))


# Why a PF cannot have VFs at all; also the reconcile refusal's reason (a metric label).
NO_SRIOV = "no_sriov"
NO_PF_DRIVER = "no_pf_driver"


def sriov_blocker(pf: PfInfo) -> str | None:
    """The one judge of "this PF cannot give VFs": NO_SRIOV (no SR-IOV capability), NO_PF_DRIVER
    (no driver bound), or None. Discovery reports it, the planner refuses by it."""
    if not pf.sriov_capable:
        return NO_SRIOV
    if pf.driver is None:
        return NO_PF_DRIVER
    return None


def pf_problem(match: PfMatch, pf: PfInfo) -> str | None:
    """Why a matched PF cannot give VFs at all, in a sentence for the log and health, or None."""
    where = f"{match.resource.resource_name}: PF {match.pf.selector.describe()} ({pf.pci_address})"
    blocker = sriov_blocker(pf)
    if blocker == NO_SRIOV:
        return f"{where}: the device has no SR-IOV capability (no sriov_totalvfs)"
    if blocker == NO_PF_DRIVER:
        return f"{where}: no driver is bound, so no VFs can be created"
    return None
