"""The node as last read: one resolution and one observation, published as the kubelet's views.

A rescan reads every configured PF and its VFs from sysfs, lays netlink's link state over it,
debounces recoveries and fences, and publishes one view per served resource into the ViewHub,
where the ListAndWatch streams pick it up. Listeners (wired by agent.app) hear when a PF
(re)appears, after every re-read, after every publication and when the served resource set changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

from agent.config import Config
from agent.core.discovery import Resolution, pf_problem, resolve_pfs
from agent.core.hygiene import fenced
from agent.core.inventory import NodeState, build_view, with_netlink
from agent.errors import NetlinkOpError, OperationTimeoutError, SysfsError, shorten
from agent.logs import ctx
from agent.model import PciDevice, PfInfo, PfLink, ResourceView
from agent.services.resources import ResourceSet
from agent.services.views import ViewHub
from agent.stats import Stats

log = logging.getLogger(__name__)

# While a VF a pod holds is pinned to its old resource, ask PodResources this often whether the pod
# let go (the API has no watch; nothing polls while no VF is pinned).
PIN_POLL_S = 10.0


class NodeReader(Protocol):
    """sysfs as discovery reads it (real: adapters.sysfs.SysfsHost)."""

    def list_pci(self) -> list[PciDevice]: ...

    def netdev_pci_address(self, ifname: str) -> str | None: ...

    def read_pf(self, address: str, with_vfs: bool = True) -> PfInfo: ...

    def dev_path_exists(self, path: str) -> bool: ...


class LinkReader(Protocol):
    """rtnetlink and devlink as the reconcile's read of the node needs them (real:
    adapters.netlink_vf.PyrouteVfNetlink; the executor's VfNetlinkPort)."""

    def read_pf(self, ifname: str) -> PfLink: ...

    def eswitch_mode(self, pci_address: str) -> str | None: ...


class LinkHealth(Protocol):
    """Netlink's link state and the recovery debounce (real: services.healthwatch.HealthWatch)."""

    settle_s: float

    def overlay(self, pf: PfInfo) -> PfInfo: ...

    def settle(self, view: ResourceView, stats: Stats, held: Collection[str] = ()) -> ResourceView: ...

    def retry(self, failures: int) -> float: ...


class Holdings(Protocol):
    """Which VFs pods hold (real: services.ledger.PodLedger)."""

    def held(self) -> frozenset[str]: ...

    async def refresh(self) -> frozenset[str]: ...


class ScanSink(Protocol):
    """Where the problems of each read go (real: services.reporting.HealthReport)."""

    def scanned(self, problems: Sequence[str]) -> None: ...


class NodeInventory:
    def __init__(self, *, reader: NodeReader, resources: ResourceSet, hub: ViewHub, links: LinkHealth,
                 ledger: Holdings, fences: Mapping[str, str], stats: Stats, sink: ScanSink,
                 pin_poll_s: float = PIN_POLL_S) -> None:
        self.reader = reader
        self.resources = resources
        self.hub = hub
        self.links = links
        self.ledger = ledger
        self.fences = fences
        self.stats = stats
        self.sink = sink
        self.pin_poll_s = pin_poll_s
        self.node = NodeState({})
        self.resolution = Resolution((), ())
        self.pf_listeners: list[Callable[[frozenset[str]], None]] = []  # PFs (re)appeared
        self.node_listeners: list[Callable[[NodeState], None]] = []  # after each re-read
        self.published_listeners: list[Callable[[], None]] = []  # after the views were published
        self.resources_listeners: list[Callable[[], None]] = []  # the served resource set changed
        self._scan_lock = asyncio.Lock()
        self._scan_failures = 0  # rescans in a row that raised
        self._pins = asyncio.Event()  # a VF was pinned: the releaser has work

    # ------------------------------------------------------------ reading
    def resolve(self) -> Resolution:
        config = self.resources.config
        pci = self.reader.list_pci()
        names = {pf.selector.pf_name for _, pf in config.all_pfs() if pf.selector.pf_name}
        owners = {n: self.reader.netdev_pci_address(n) for n in names}
        return resolve_pfs(config, pci, owners)

    def scan(self, keep: Collection[str] = (),
             links: LinkReader | None = None) -> tuple[Resolution, NodeState]:
        """Read every configured PF and its VFs from sysfs (blocking file reads; fast).

        A PF that is missing, unreadable or cannot have VFs is a problem logged once (when it
        first appears) and listed in the resolution; every other PF is still served. PFs in
        ``keep`` (holding a VF a pod still uses) are read even when the config dropped them.
        With ``links`` (a reconcile's read), rtnetlink and devlink add what the planner needs: admin
        state, MTU, the VFs' PF-side attributes, the eswitch mode.
        """
        res = self.resolve()
        pfs: dict[str, PfInfo] = {}
        problems = list(res.problems)
        for m in res.matches:
            try:
                pf = self.reader.read_pf(m.pci_address)
            except SysfsError as e:
                problems.append(f"{m.resource.resource_name}: PF {m.pci_address}: cannot read: {e}")
                continue
            pfs[m.pci_address] = pf if links is None else _with_links(pf, links)
            problem = pf_problem(m, pf)
            if problem is not None:
                problems.append(problem)
        for address in sorted(set(keep) - pfs.keys()):
            with contextlib.suppress(SysfsError):
                pfs[address] = self.reader.read_pf(address)
        for problem in problems:
            if problem not in self.resolution.problems:
                log.error("%s", problem, extra=ctx("discover"))
        return Resolution(res.matches, tuple(problems)), NodeState(pfs)

    def watched_names(self) -> set[str]:
        """Netdev names of every served PF and VF, plus the PF names the config asks for."""
        names = {pf.selector.pf_name for _, pf in self.resources.config.all_pfs() if pf.selector.pf_name}
        for pf in self.node.pfs.values():
            names.update(nd.name for nd in (pf.netdev, *(vf.netdev for vf in pf.vfs)) if nd is not None)
        return names

    # ------------------------------------------------------------ publishing
    async def observe(self, reason: str, links: LinkReader, timeout: float, *,
                      adopt: bool = True) -> tuple[Resolution, NodeState]:
        """A reconcile round's one read of the node (with ``links``), published like any rescan: the
        planner and the kubelet's views derive from the same observation. Raises when the read fails
        or takes longer than ``timeout`` (a hung kernel call): the reconcile then retries.
        ``adopt=False`` (`serve --dry-run`) only reads: no listener runs, nothing is published or
        written (device-info files included)."""
        async with self._scan_lock:
            keep = self._keep()
            try:
                async with asyncio.timeout(timeout):
                    res, node = await asyncio.to_thread(self.scan, keep, links)
            except TimeoutError:
                raise OperationTimeoutError("read the node", "node", timeout,
                                            "a sysfs or netlink read did not return") from None
            if not adopt:
                return res, node
            await self._adopt(res, node, reason)
        return self.resolution, self.node

    async def rescan(self, reason: str = "") -> None:
        """Re-read the node and push any change to the kubelet at once.

        The sysfs walk runs in a worker thread so link events keep reaching the kubelet while it
        runs; netlink's link state is laid over the result again when it is published, so a flip
        that happened during the walk is not undone by it. The first rescan after a config reload
        also applies the resource set (see ResourceSet.set_config).

        A read that fails unexpectedly is logged and tried again (backing off) instead of ending the
        event callback that asked for it: the last published views stay in force meanwhile.
        """
        async with self._scan_lock:
            try:
                res, node = await asyncio.to_thread(self.scan, self._keep())
            except Exception as e:
                self._scan_failures += 1
                delay = self.links.retry(self._scan_failures)
                log.error("reading the node failed (%s); keeping the last view, trying again in %gs: %s",
                          reason or "rescan", delay, shorten(str(e), 200), exc_info=self._scan_failures == 1,
                          extra=ctx("discover", reason=type(e).__name__))
                return
            self._scan_failures = 0
            await self._adopt(res, node, reason)

    def _keep(self) -> set[str]:
        """PFs read even when the config dropped them: they hold a VF a pod still uses."""
        keep = {pf for _, pf in self.resources.pinned.values()}
        if self.resources.moved_from is not None:
            held = self.ledger.held()
            keep |= {d.pf_pci_address for v in self.hub.views.values() for d in v.devices if d.id in held}
        return keep

    async def _adopt(self, res: Resolution, node: NodeState, reason: str) -> None:
        """Make a read the node as last read: tell the listeners, publish the views."""
        moved_from = self.resources.moved_from
        node = NodeState({a: self.links.overlay(pf) for a, pf in node.pfs.items()})
        before = {a for a, p in self.node.pfs.items() if p.driver}
        scanned_before = bool(self.resolution.matches or self.resolution.problems)
        self.resolution, self.node = res, node
        appeared = frozenset(a for a, p in node.pfs.items() if p.driver) - before
        if appeared and scanned_before:
            for listener in self.pf_listeners:
                listener(appeared)
        for node_listener in self.node_listeners:
            node_listener(node)
        unread = [f"cannot read PF {m.pci_address}" for m in res.matches if m.pci_address not in node.pfs]
        self.sink.scanned([*res.problems, *unread])
        if moved_from is not None:
            self._pin_moved(res, node, moved_from)
        await self._publish_views(res, node, reason)
        if moved_from is not None:
            self.resources.moved_from = None
            self._resources_changed()

    async def refresh_links(self, reason: str) -> None:
        """Re-derive health from the node as last read, with netlink's newest link state.

        A carrier flip changes nothing sysfs would add, so skipping the sysfs walk keeps the
        kubelet's view within milliseconds of the kernel event.
        """
        self.node = NodeState({a: self.links.overlay(pf) for a, pf in self.node.pfs.items()})
        await self._publish_views(self.resolution, self.node, reason)

    async def _publish_views(self, res: Resolution, node: NodeState, reason: str) -> None:
        in_pod = self.ledger.held()
        pinned = self.resources.pinned
        self.links.settle_s = self.resources.config.health.recovery_s
        for resource in self.resources.served():
            name = resource.resource_name
            pfs = [node.pfs[m.pci_address] for m in res.for_resource(name) if m.pci_address in node.pfs]
            here = {d for d, (r, _) in pinned.items() if r == name}
            elsewhere = pinned.keys() - here
            mine = {p.pci_address for p in pfs}
            extra = sorted({pf for d, (_, pf) in pinned.items() if d in here} - mine)
            observed = build_view(resource, [*pfs, *(node.pfs[a] for a in extra if a in node.pfs)], in_pod,
                                  self.reader.dev_path_exists)
            devices = tuple(d for d in observed.devices if d.id not in elsewhere
                            and (d.pf_pci_address in mine or d.id in here))
            # The fence goes over the debounced view: lifting it must not wait out a recovery hold.
            view = fenced(self.links.settle(ResourceView(name, devices), self.stats, in_pod), self.fences)
            old = self.hub.views.get(name)
            if await self.hub.publish(view):
                _log_transitions(old, view, reason)
        for listener in self.published_listeners:
            listener()

    def _resources_changed(self) -> None:
        for listener in self.resources_listeners:
            listener()

    # ------------------------------------------------------------ VFs a reload moved
    def _pin_moved(self, res: Resolution, node: NodeState, old: Config) -> None:
        """A VF a pod holds stays in the resource that handed it out until the pod lets go, even
        when a reload moved its PF to another resource or removed the resource."""
        held = self.ledger.held()
        pinned, retired = self.resources.pinned, self.resources.retired
        owner = {m.pci_address: m.resource.resource_name for m in res.matches}
        before = {r.resource_name: r for r in old.resources}
        names = {r.resource_name for r in self.resources.config.resources}
        for name, view in self.hub.views.items():
            for d in view.devices:
                if d.id in held and d.id not in pinned and owner.get(d.pf_pci_address) != name \
                        and d.pf_pci_address in node.pfs:
                    pinned[d.id] = (name, d.pf_pci_address)
                    log.info("VF held by a pod stays in %s until released", name,
                             extra=ctx("config-reload", d.id, resource=name, pf=d.pf_pci_address))
                    if name not in names and name in before:
                        retired.setdefault(name, before[name])
        if pinned:
            self._pins.set()

    async def release_pins(self) -> None:
        """Root task: while VFs are pinned, ask who holds what, and let the released ones move."""
        while True:
            await self._pins.wait()
            self._pins.clear()
            while self.resources.pinned:
                await asyncio.sleep(self.pin_poll_s)
                held = await self.ledger.refresh()
                pinned = self.resources.pinned
                released = [d for d in pinned if d not in held]
                if not released:
                    continue
                for d in released:
                    resource, _ = pinned.pop(d)
                    log.info("VF released by its pod; it leaves %s", resource,
                             extra=ctx("config-reload", d, resource=resource))
                still = {r for r, _ in pinned.values()}
                self.resources.retired = {n: r for n, r in self.resources.retired.items() if n in still}
                await self.rescan("pinned VF released")
                self._resources_changed()


def _log_transitions(old: ResourceView | None, new: ResourceView, reason: str) -> None:
    before = old.by_id() if old else {}
    after = new.by_id()
    for dev_id, d in after.items():
        prev = before.get(dev_id)
        why = d.reason or reason or None
        if prev is None:
            log.info("device added (%s)", d.health.value,
                     extra=ctx("device-add", dev_id, resource=new.resource_name, reason=why))
        elif prev.health != d.health:
            log.warning("device %s -> %s", prev.health.value, d.health.value,
                        extra=ctx("health", dev_id, resource=new.resource_name, reason=why))
    for dev_id in before.keys() - after.keys():
        log.info("device removed", extra=ctx("device-remove", dev_id, resource=new.resource_name))


def _with_links(pf: PfInfo, links: LinkReader) -> PfInfo:
    """The PF with rtnetlink's and devlink's word; what they cannot say stays unknown (None)."""
    link = None
    if pf.netdev is not None:
        with contextlib.suppress(NetlinkOpError):
            link = links.read_pf(pf.netdev.name)
    try:
        eswitch = links.eswitch_mode(pf.pci_address)
    except NetlinkOpError:
        eswitch = None
    return with_netlink(pf, link, eswitch)
