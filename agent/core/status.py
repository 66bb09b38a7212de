"""What the agent observes, as rows: read at scrape time by metrics and on request by `status`.

Both views are built from the same rows so `sriov-rdma-agent status` and the dashboard never
disagree. Pure: the rows are computed from the plain state an ``ObservedAgent`` hands over when asked
(agent.services.status is the one the app builds).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from agent.config import Config
from agent.core.discovery import Resolution
from agent.core.inventory import NodeState
from agent.model import Health, PfInfo, PfReconcileStatus, ResourceView


@dataclass(frozen=True)
class PodRef:
    """The container a device is assigned to, as the kubelet PodResources API reports it."""

    namespace: str
    pod: str
    container: str


class PodDirectory(Protocol):
    """Which container holds which device. Raises an AgentError when the kubelet cannot be asked."""

    async def device_owners(self) -> Mapping[tuple[str, str], PodRef]:
        """(resource name, device ID) -> the container it is assigned to."""
        ...


class _Hub(Protocol):
    @property
    def views(self) -> Mapping[str, ResourceView]: ...


class _Registration(Protocol):
    @property
    def registered(self) -> bool: ...


class ObservedAgent(Protocol):
    """The agent's state that metrics and status read (all plain state)."""

    @property
    def config(self) -> Config: ...

    @property
    def node(self) -> NodeState: ...

    @property
    def resolution(self) -> Resolution: ...

    @property
    def hub(self) -> _Hub: ...

    @property
    def fences(self) -> Mapping[str, str]: ...

    def held(self) -> Collection[str]:
        """VFs pods hold, by the ledger's last word (no kubelet call)."""
        ...

    @property
    def lifecycles(self) -> Mapping[str, _Registration]: ...

    @property
    def reconcile_status(self) -> Mapping[str, PfReconcileStatus]: ...


@dataclass(frozen=True)
class PfRow:
    resource: str
    pf: PfInfo
    desired_vfs: int | None  # None: externally managed without numVfs
    reconcile: PfReconcileStatus | None  # None until the lifecycle has reconciled this PF

    @property
    def eswitch_mode(self) -> str | None:
        return self.pf.eswitch_mode or (self.reconcile.eswitch_mode if self.reconcile else None)


@dataclass(frozen=True)
class VfRow:
    resource: str
    pf: str  # PF PCI address
    vf: str  # VF PCI address = the device ID the kubelet sees
    index: int
    netdev: str
    rdma_device: str
    healthy: bool
    reason: str
    allocated: bool
    owner: PodRef | None
    resetting: bool = False  # fenced: released by its pod and being put back to the baseline


def pf_rows(agent: ObservedAgent) -> list[PfRow]:
    """Every configured PF that is present, in config order."""
    rows = []
    for m in agent.resolution.matches:
        pf = agent.node.pfs.get(m.pci_address)
        if pf is not None:
            rows.append(PfRow(m.resource.resource_name, pf, m.pf.num_vfs,
                              agent.reconcile_status.get(m.pci_address)))
    return rows


def vf_rows(agent: ObservedAgent, owners: Mapping[tuple[str, str], PodRef] | None) -> list[VfRow]:
    """Every advertised VF. "allocated" is the agent's ledger (PodResources, plus Allocates the kubelet
    has not listed yet; our own Allocate record alone when it cannot be asked); ``owners`` names pods."""
    held = agent.held()
    rows = []
    vfs = {vf.pci_address: vf for pf in agent.node.pfs.values() for vf in pf.vfs}
    for resource, view in sorted(agent.hub.views.items()):
        for d in view.devices:
            vf = vfs.get(d.id)
            owner = owners.get((resource, d.id)) if owners is not None else None
            allocated = owner is not None or d.id in held
            rows.append(VfRow(
                resource=resource, pf=d.pf_pci_address, vf=d.id, index=vf.index if vf else -1,
                netdev=vf.netdev.name if vf and vf.netdev else "",
                rdma_device=vf.rdma.name if vf and vf.rdma else "",
                healthy=d.health is Health.HEALTHY, reason=d.reason, allocated=allocated, owner=owner,
                resetting=d.id in agent.fences,
            ))
    return rows


def status_document(agent: ObservedAgent, owners: Mapping[tuple[str, str], PodRef] | None) -> dict[str, Any]:
    """A JSON-ready picture of the node for `sriov-rdma-agent status`."""
    pfs = []
    for row in pf_rows(agent):
        pf = row.pf
        port = pf.rdma.ports[0] if pf.rdma and pf.rdma.ports else None
        pfs.append({
            "resource": row.resource, "pf": pf.pci_address, "netdev": pf.netdev.name if pf.netdev else "",
            "link": ("up" if pf.netdev.carrier else "down") if pf.netdev else "absent",
            "speed_mbps": pf.netdev.speed_mbps if pf.netdev else None,
            "mtu": pf.netdev.mtu if pf.netdev else None,
            "vfs": pf.sriov_numvfs, "desired_vfs": row.desired_vfs, "max_vfs": pf.sriov_totalvfs,
            "eswitch_mode": row.eswitch_mode,
            "reconcile": row.reconcile.state.value if row.reconcile else "",
            "reconcile_reason": row.reconcile.message or row.reconcile.reason if row.reconcile else "",
            "rdma_device": pf.rdma.name if pf.rdma else "",
            "rdma_state": f"{port.state}: {port.state_name}" if port else "",
        })
    vfs = []
    for v in vf_rows(agent, owners):
        item = asdict(v)
        item["owner"] = asdict(v.owner) if v.owner else None
        vfs.append(item)
    return {
        "pfs": pfs,
        "vfs": vfs,
        "registered": {name: lc.registered for name, lc in sorted(agent.lifecycles.items())},
        "pod_resources": owners is not None,
        "problems": list(agent.resolution.problems),
    }


def render(doc: Mapping[str, Any]) -> str:
    """The status document as fixed-width tables a person reads in a terminal."""
    lines = ["PHYSICAL FUNCTIONS"]
    pf_cols = ("RESOURCE", "PF", "NETDEV", "LINK", "SPEED", "MTU", "VFS", "ESWITCH", "RDMA", "PORT",
               "RECONCILE")
    pf_table: list[tuple[str, ...]] = [pf_cols]
    for p in doc["pfs"]:
        want = "" if p["desired_vfs"] is None else f"/{p['desired_vfs']}"
        speed = f"{p['speed_mbps'] // 1000}G" if p["speed_mbps"] else "-"
        pf_table.append((p["resource"], p["pf"], p["netdev"] or "-", p["link"], speed,
                         str(p["mtu"] or "-"), f"{p['vfs']}{want} (max {p['max_vfs']})",
                         p["eswitch_mode"] or "-", p["rdma_device"] or "-", p["rdma_state"] or "-",
                         _reconcile(p)))
    lines += _table(pf_table)
    lines += ["", "VIRTUAL FUNCTIONS"]
    vf_cols = ("RESOURCE", "VF", "PF", "#", "NETDEV", "RDMA", "HEALTH", "ALLOCATED", "POD")
    vf_table: list[tuple[str, ...]] = [vf_cols]
    for v in doc["vfs"]:
        health = "Healthy" if v["healthy"] else f"Unhealthy ({v['reason']})"
        if v.get("resetting"):  # reason "resetting" or "resetting: failed (...); retry in 2s"
            detail = v["reason"].removeprefix("resetting").removeprefix(": ")
            health = f"Resetting ({detail})" if detail else "Resetting"
        owner = v["owner"]
        pod = f"{owner['namespace']}/{owner['pod']}/{owner['container']}" if owner else "-"
        vf_table.append((v["resource"], v["vf"], v["pf"], str(v["index"]), v["netdev"] or "-",
                         v["rdma_device"] or "-", health, "yes" if v["allocated"] else "no", pod))
    lines += _table(vf_table)
    lines.append("")
    reg = ", ".join(f"{r}: {'registered' if ok else 'NOT registered'}" for r, ok in doc["registered"].items())
    lines.append(f"kubelet: {reg or 'no resources'}")
    for component, h in doc.get("health", {}).items():
        state = "SERVING" if h["serving"] else "NOT_SERVING"
        lines.append(f"health {component}: {state}{' (' + h['reason'] + ')' if h['reason'] else ''}")
    if not doc["pod_resources"]:
        lines.append("pods: kubelet PodResources API unreachable; ALLOCATED is from the agent's own records")
    lines += [f"problem: {p}" for p in doc["problems"]]
    return "\n".join(lines)


def _reconcile(p: Mapping[str, Any]) -> str:
    if not p["reconcile"]:
        return "-"
    return f"{p['reconcile']}" + (f" ({p['reconcile_reason']})" if p["reconcile_reason"] else "")


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
