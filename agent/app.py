"""Composition root: builds adapters from Settings, owns the node state, runs the root tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.adapters.deviceplugin import DevicePluginServer, DevicePluginServicer
from agent.adapters.devinfo import DevinfoDir
from agent.adapters.health_server import DEVICEPLUGIN, LIFECYCLE, MONITOR, HealthServer
from agent.adapters.kubelet import PluginLifecycle
from agent.adapters.podresources import CachedPodDirectory, PodResourcesClient
from agent.adapters.status_server import StatusServer
from agent.adapters.sysfs import SysfsHost, SysfsWriter
from agent.config import Config, ResourceConfig, parse_config, read_config_bytes
from agent.core.discovery import Resolution, pf_problem, resolve_pfs
from agent.core.hygiene import fenced
from agent.core.inventory import (
    NodeState,
    allocate_all,
    build_view,
    devinfo_files,
    devinfo_owner,
    preferred_allocation,
)
from agent.errors import AgentError, AllocationError, DevinfoError, SysfsError, shorten
from agent.guard import guarded
from agent.healthwatch import HealthWatch
from agent.ledger import Allocation, PodLedger
from agent.logs import ctx
from agent.model import ContainerAllocation, PfInfo, PfReconcileStatus, ResourceView
from agent.settings import Settings
from agent.stats import Stats
from agent.status import PodRef, status_document

if TYPE_CHECKING:
    from agent.adapters.executor import Timeouts, VfNetlinkPort
    from agent.adapters.metrics import AgentMetrics, MetricsServer
    from agent.lifecycle import Lifecycle

log = logging.getLogger(__name__)

# While a VF a pod holds is pinned to its old resource, ask PodResources this often whether the pod
# let go (the API has no watch; nothing polls while no VF is pinned).
PIN_POLL_S = 10.0


class ViewHub:
    """The latest ResourceView per resource, with a version that ListAndWatch streams wait on."""

    def __init__(self) -> None:
        self.views: dict[str, ResourceView] = {}
        self.versions: dict[str, int] = {}
        self._cond = asyncio.Condition()

    def current(self, resource: str) -> tuple[int, ResourceView]:
        return self.versions.get(resource, 0), self.views.get(resource, ResourceView(resource))

    async def publish(self, view: ResourceView) -> bool:
        """Store a view; wake watchers only if it differs from the last one."""
        if self.views.get(view.resource_name) == view:
            return False
        self.views[view.resource_name] = view
        self.versions[view.resource_name] = self.versions.get(view.resource_name, 0) + 1
        async with self._cond:
            self._cond.notify_all()
        return True

    async def changed(self, resource: str, after: int) -> tuple[int, ResourceView]:
        async with self._cond:
            await self._cond.wait_for(lambda: self.versions.get(resource, 0) != after)
        return self.current(resource)


class ResourceBackend:
    """PluginBackend for one resource, reading the agent's shared state."""

    def __init__(self, agent: Agent, resource: ResourceConfig) -> None:
        self.agent = agent
        self.resource = resource

    def current(self) -> tuple[int, ResourceView]:
        return self.agent.hub.current(self.resource.resource_name)

    async def changed(self, after_version: int) -> tuple[int, ResourceView]:
        return await self.agent.hub.changed(self.resource.resource_name, after_version)

    def allocate(self, requests: Sequence[Sequence[str]]) -> list[ContainerAllocation]:
        """All container requests of one call, or none: nothing is written or recorded for a call
        that fails, whichever container request fails it. ``resource`` follows config reloads."""
        for ids in requests:  # the fence, not the view: a VF fenced an instant ago is not in a view yet
            for dev_id in ids:
                if dev_id in self.agent.fences:
                    raise AllocationError(dev_id, self.agent.fences[dev_id])
        _, view = self.current()
        results = allocate_all(self.resource, requests, view, self.agent.node,
                               self.agent.sysfs.dev_path_exists)
        self.agent.write_devinfo(results)
        for ids in requests:
            self.agent.ledger.record(self.resource.resource_name, ids)
        return results

    def preferred(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]:
        _, view = self.current()
        return preferred_allocation(available, must_include, size, view)


RootTask = Callable[["Agent"], Coroutine[Any, Any, None]]


@dataclass
class _Plugin:
    """One served resource: its backend, its socket's lifecycle and the task running it."""

    backend: ResourceBackend
    lifecycle: PluginLifecycle
    task: asyncio.Task[None]


@dataclass
class Agent:
    settings: Settings
    config: Config
    sysfs: SysfsHost
    hub: ViewHub = field(default_factory=ViewHub)
    node: NodeState = field(default_factory=lambda: NodeState({}))
    resolution: Resolution = field(default_factory=lambda: Resolution((), ()))
    ledger: PodLedger = field(default_factory=PodLedger)  # which VFs pods hold
    fences: dict[str, str] = field(default_factory=dict)  # VF -> why it is fenced (VF hygiene)
    lifecycles: dict[str, PluginLifecycle] = field(default_factory=dict)
    extra_tasks: list[RootTask] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    started_at: float = field(default_factory=time.monotonic)
    metrics: AgentMetrics | None = None  # None where nothing is served: prometheus_client not loaded
    pods: CachedPodDirectory | None = None  # who holds which VF, for scrapes and `status`
    health: HealthServer | None = None
    metrics_server: MetricsServer | None = None
    status_server: StatusServer | None = None
    writes: bool = False  # VFs are created and configured (the host's sysfs, or a faithful writer)
    lifecycle: Lifecycle | None = None  # VF lifecycle and config reload (SIGHUP asks it too)
    _scan_problems: list[str] = field(default_factory=list)
    health_watch: HealthWatch = field(default_factory=HealthWatch)  # link overlay, debounce, re-checks
    before_serving: list[RootTask] = field(default_factory=list)  # awaited after the first scan
    pf_listeners: list[Callable[[frozenset[str]], None]] = field(default_factory=list)  # PFs (re)appeared
    node_listeners: list[Callable[[NodeState], None]] = field(default_factory=list)  # after each re-read
    reconcile_status: dict[str, PfReconcileStatus] = field(default_factory=dict)  # by PF, last reconcile
    plugins: dict[str, _Plugin] = field(default_factory=dict)  # by resource name, while running
    pinned: dict[str, tuple[str, str]] = field(default_factory=dict)  # VF -> (old resource, its PF)
    retired: dict[str, ResourceConfig] = field(default_factory=dict)  # removed, still serving a pinned VF
    pin_poll_s: float = PIN_POLL_S
    devinfo_synced: dict[str, str] | None = None  # device-info files last made to match, by name
    devinfo_resources: set[str] = field(default_factory=set)  # every resource served since start
    _scan_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _scan_failures: int = 0  # rescans in a row that raised
    _run_task: asyncio.Task[None] | None = None
    _tg: asyncio.TaskGroup | None = None
    _releaser: asyncio.Task[None] | None = None
    _plugin_problems: dict[str, str] = field(default_factory=dict)  # resource -> why it cannot serve
    _monitor_problems: dict[str, str] = field(default_factory=dict)  # watcher -> why it failed
    _moved_from: Config | None = None  # the config before a reload not yet applied by a rescan

    # ------------------------------------------------------------ state
    @property
    def allocations(self) -> dict[str, Allocation]:
        """The agent's own Allocate record (the ledger's fallback)."""
        return self.ledger.records

    def in_pod(self) -> frozenset[str]:
        return self.ledger.held()

    def resolve(self) -> Resolution:
        pci = self.sysfs.list_pci()
        names = {pf.selector.pf_name for _, pf in self.config.all_pfs() if pf.selector.pf_name}
        owners = {n: self.sysfs.netdev_pci_address(n) for n in names}
        return resolve_pfs(self.config, pci, owners)

    def scan(self, keep: Collection[str] = ()) -> tuple[Resolution, NodeState]:
        """Read every configured PF and its VFs from sysfs (blocking file reads; fast).

        A PF that is missing, unreadable or cannot have VFs is a problem logged once (when it
        first appears) and listed in the resolution; every other PF is still served. PFs in
        ``keep`` (holding a VF a pod still uses) are read even when the config dropped them.
        """
        res = self.resolve()
        pfs: dict[str, PfInfo] = {}
        problems = list(res.problems)
        for m in res.matches:
            try:
                pf = self.sysfs.read_pf(m.pci_address)
            except SysfsError as e:
                problems.append(f"{m.resource.resource_name}: PF {m.pci_address}: cannot read: {e}")
                continue
            pfs[m.pci_address] = pf
            problem = pf_problem(m, pf)
            if problem is not None:
                problems.append(problem)
        for address in sorted(set(keep) - pfs.keys()):
            with contextlib.suppress(SysfsError):
                pfs[address] = self.sysfs.read_pf(address)
        for problem in problems:
            if problem not in self.resolution.problems:
                log.error("%s", problem, extra=ctx("discover"))
        return Resolution(res.matches, tuple(problems)), NodeState(pfs)

    async def rescan(self, reason: str = "") -> None:
        """Re-read the node and push any change to the kubelet at once.

        The sysfs walk runs in a worker thread so link events keep reaching the kubelet while it
        runs; netlink's link state is laid over the result again when it is published, so a flip
        that happened during the walk is not undone by it. The first rescan after a config reload
        also applies the resource set (see set_config).

        A read that fails unexpectedly is logged and tried again (backing off) instead of ending the
        event callback that asked for it: the last published views stay in force meanwhile.
        """
        async with self._scan_lock:
            moved_from = self._moved_from
            keep = {pf for _, pf in self.pinned.values()}
            if moved_from is not None:
                held = self.in_pod()
                keep |= {d.pf_pci_address for v in self.hub.views.values() for d in v.devices if d.id in held}
            try:
                res, node = await asyncio.to_thread(self.scan, keep)
            except Exception as e:
                self._scan_failures += 1
                delay = self.health_watch.retry(self._scan_failures)
                log.error("reading the node failed (%s); keeping the last view, trying again in %gs: %s",
                          reason or "rescan", delay, shorten(str(e), 200), exc_info=self._scan_failures == 1,
                          extra=ctx("discover", reason=type(e).__name__))
                return
            self._scan_failures = 0
            node = NodeState({a: self.health_watch.overlay(pf) for a, pf in node.pfs.items()})
            before = {a for a, p in self.node.pfs.items() if p.driver}
            scanned_before = bool(self.resolution.matches or self.resolution.problems)
            self.resolution, self.node = res, node
            appeared = frozenset(a for a, p in node.pfs.items() if p.driver) - before
            if appeared and scanned_before:
                for listener in self.pf_listeners:
                    listener(appeared)
            for node_listener in self.node_listeners:
                node_listener(node)
            self._report_scan(res, node)
            if moved_from is not None:
                self._pin_moved(res, node, moved_from)
            await self._publish_views(res, node, reason)
            if moved_from is not None:
                self._moved_from = None
                self.sync_plugins()

    async def refresh_links(self, reason: str) -> None:
        """Re-derive health from the node as last read, with netlink's newest link state.

        A carrier flip changes nothing sysfs would add, so skipping the sysfs walk keeps the
        kubelet's view within milliseconds of the kernel event.
        """
        self.node = NodeState({a: self.health_watch.overlay(pf) for a, pf in self.node.pfs.items()})
        await self._publish_views(self.resolution, self.node, reason)

    async def _publish_views(self, res: Resolution, node: NodeState, reason: str) -> None:
        in_pod = self.in_pod()
        self.health_watch.settle_s = self.config.health.recovery_s
        for resource in self.served_resources():
            name = resource.resource_name
            pfs = [node.pfs[m.pci_address] for m in res.for_resource(name) if m.pci_address in node.pfs]
            here = {d for d, (r, _) in self.pinned.items() if r == name}
            elsewhere = self.pinned.keys() - here
            mine = {p.pci_address for p in pfs}
            extra = sorted({pf for d, (_, pf) in self.pinned.items() if d in here} - mine)
            observed = build_view(resource, [*pfs, *(node.pfs[a] for a in extra if a in node.pfs)], in_pod)
            devices = tuple(d for d in observed.devices if d.id not in elsewhere
                            and (d.pf_pci_address in mine or d.id in here))
            # The fence goes over the debounced view: lifting it must not wait out a recovery hold.
            view = fenced(self.health_watch.settle(ResourceView(name, devices), self.stats, in_pod),
                          self.fences)
            old = self.hub.views.get(name)
            if await self.hub.publish(view):
                self._log_transitions(old, view, reason)
        self.sync_devinfo()

    def _pin_moved(self, res: Resolution, node: NodeState, old: Config) -> None:
        """A VF a pod holds stays in the resource that handed it out until the pod lets go, even
        when a reload moved its PF to another resource or removed the resource."""
        held = self.in_pod()
        owner = {m.pci_address: m.resource.resource_name for m in res.matches}
        before = {r.resource_name: r for r in old.resources}
        names = {r.resource_name for r in self.config.resources}
        for name, view in self.hub.views.items():
            for d in view.devices:
                if d.id in held and d.id not in self.pinned and owner.get(d.pf_pci_address) != name \
                        and d.pf_pci_address in node.pfs:
                    self.pinned[d.id] = (name, d.pf_pci_address)
                    log.info("VF held by a pod stays in %s until released", name,
                             extra=ctx("config-reload", d.id, resource=name, pf=d.pf_pci_address))
                    if name not in names and name in before:
                        self.retired.setdefault(name, before[name])
        if self.pinned and self._tg is not None and (self._releaser is None or self._releaser.done()):
            self._releaser = self._tg.create_task(guarded("pinned VF release", self._release_pins,
                                                          self.stats)(), name="release-pins")

    async def _release_pins(self) -> None:
        """Until every pinned VF is released: ask who holds what, and let the released ones move."""
        while self.pinned:
            await asyncio.sleep(self.pin_poll_s)
            held = await self.held_devices()
            released = [d for d in self.pinned if d not in held]
            if not released:
                continue
            for d in released:
                resource, _ = self.pinned.pop(d)
                log.info("VF released by its pod; it leaves %s", resource,
                         extra=ctx("config-reload", d, resource=resource))
            still = {r for r, _ in self.pinned.values()}
            self.retired = {n: r for n, r in self.retired.items() if n in still}
            await self.rescan("pinned VF released")
            self.sync_plugins()

    def set_config(self, new: Config) -> None:
        """Adopt a reloaded config; the next rescan (whoever asks for it) applies it: new resources
        get a plugin server, removed ones lose theirs, PFs move between resources. Resources that
        did not change keep their sockets, streams and registrations; a VF a pod holds stays where
        it was until released."""
        if self._moved_from is None:
            self._moved_from = self.config
        self.config = new

    async def held_devices(self) -> frozenset[str]:
        """VF IDs held by pods, asked of the kubelet now (the ledger: PodResources, else our record)."""
        return await self.ledger.refresh()

    def _log_transitions(self, old: ResourceView | None, new: ResourceView, reason: str) -> None:
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

    def write_devinfo(self, allocs: Sequence[ContainerAllocation]) -> None:
        """Device-info files for Multus, written again at Allocate, mode 0444 (as the community plugin).

        Every served VF has its file already (sync_devinfo), so a failure here removes nothing: the
        call fails and records no allocation.
        """
        files = {name: content for alloc in allocs for name, content in alloc.devinfo.items()}
        try:
            DevinfoDir(self.settings.devinfo_dir).write(files)
        except DevinfoError as e:
            raise AllocationError(",".join(files), f"cannot write device-info file: {e}") from e

    def served_resources(self) -> list[ResourceConfig]:
        """The configured resources and removed ones still serving a VF a pod holds."""
        return [*self.config.resources, *self.retired.values()]

    def sync_devinfo(self, force: bool = False) -> None:
        """One device-info file for every VF served, none for a VF that is not (stale files of our
        resources included, other plugins' files never touched).

        Runs whenever the views change, so before the first registration, and forced before every
        registration: after a node reboot the kubelet re-admits pods from its checkpoint without an
        Allocate, and Multus still finds each VF's file. A file that cannot be written is logged and
        retried at the next change; serving goes on.
        """
        want: dict[str, str] = {}
        served = self.served_resources()
        for resource in served:
            view = self.hub.views.get(resource.resource_name)
            if view is not None:
                want.update(devinfo_files(resource, view, self.node))
        if want == self.devinfo_synced and not force:
            return
        # A resource a reload removed stays ours: its files go with its VFs.
        self.devinfo_resources.update(r.resource_name for r in served)
        ours = devinfo_owner(sorted(self.devinfo_resources))
        result = DevinfoDir(self.settings.devinfo_dir).sync(want, ours)
        for name in result.written:
            log.info("device-info file written", extra=ctx("devinfo-write", name))
        for name in result.removed:
            log.info("device-info file removed: its VF is not served", extra=ctx("devinfo-remove", name))
        for problem in result.problems:
            log.error("%s", problem, extra=ctx("devinfo", problem.path, reason=problem.reason))
        self.devinfo_synced = None if result.problems else want

    # ------------------------------------------------------------ running
    async def run(self, ready: asyncio.Event | None = None) -> None:
        self._run_task = asyncio.current_task()
        await guarded("startup scan", self.rescan, self.stats)("startup")
        for hook in self.before_serving:
            await hook(self)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self.sync_plugins()
                tg.create_task(self._watched(self.health_watch.timer), name="health-timer")
                for task in self.extra_tasks:
                    tg.create_task(self._watched(task))
                self._report(MONITOR, not self._monitor_problems)
                if ready is not None:
                    ready.set()
        finally:
            self._tg = None
            self.plugins.clear()

    def sync_plugins(self) -> None:
        """Serve exactly the configured resources (and removed ones still serving a pinned VF).

        A resource that stays keeps its server untouched: same socket, same ListAndWatch streams,
        no new Register. Only its backend's config follows the reload.
        """
        if self._tg is None:
            return
        wanted = {r.resource_name: r for r in self.config.resources}
        for name, resource in self.retired.items():
            wanted.setdefault(name, resource)
        for name in sorted(self.plugins.keys() - wanted.keys()):
            plugin = self.plugins.pop(name)
            plugin.task.cancel()  # PluginLifecycle.run stops its server and removes its socket
            self.lifecycles.pop(name, None)
            self.hub.views.pop(name, None)
            self._plugin_problems.pop(name, None)
            log.info("resource removed from the config: plugin server stopped", extra=ctx("config-reload",
                     resource=name))
        for name, resource in wanted.items():
            if name in self.plugins:
                self.plugins[name].backend.resource = resource
            else:
                self._start_plugin(self._tg, resource)
        self._report_plugins()

    def _start_plugin(self, tg: asyncio.TaskGroup, resource: ResourceConfig) -> None:
        name = resource.resource_name
        backend = ResourceBackend(self, resource)
        on_allocate = self.metrics.allocate_observer(name) if self.metrics else None
        servicer = DevicePluginServicer(name, backend, on_allocate=on_allocate)
        sock = os.path.join(self.settings.device_plugin_dir, resource.socket_name)
        lifecycle = PluginLifecycle(self.settings.device_plugin_dir, name, DevicePluginServer(sock, servicer),
                                    on_registered=self._registered_counter(name),
                                    before_register=lambda: self.sync_devinfo(force=True))
        self.lifecycles[name] = lifecycle

        def problem(reason: str) -> None:
            if reason:
                self._plugin_problems[name] = reason
            else:
                self._plugin_problems.pop(name, None)
            self._report_plugins()

        # A plugin directory that cannot be created (or watched) is retried, never fatal.
        serve = guarded(f"device plugin {name}", lifecycle.run, self.stats, report=problem)
        self.plugins[name] = _Plugin(backend, lifecycle, tg.create_task(serve(), name=f"plugin-{name}"))

    def _registered_counter(self, resource: str) -> Callable[[bool], None]:
        def on_registered(ok: bool) -> None:
            if ok:
                self.stats.inc("kubelet_registrations", resource=resource)
                self._plugin_problems.pop(resource, None)
            self._report_plugins()
        return on_registered

    def _report_plugins(self) -> None:
        """Deviceplugin health: why a resource cannot serve, else which ones are not registered."""
        problems = [f"{n}: {p}" for n, p in sorted(self._plugin_problems.items())]
        waiting = sorted(name for name, lc in self.lifecycles.items() if not lc.registered)
        if problems:
            self._report(DEVICEPLUGIN, False, "; ".join(problems))
        else:
            self._report(DEVICEPLUGIN, not waiting, f"not registered with the kubelet: {', '.join(waiting)}"
                         if waiting else "")

    async def _watched(self, task: RootTask) -> None:
        """Run a root task (a watcher) under the guard: a failure turns the monitor component
        NOT_SERVING with its reason until the retried watcher runs again."""
        name = getattr(task, "__qualname__", "watcher").replace(".<locals>", "")

        def problem(reason: str) -> None:
            if reason:
                self._monitor_problems[name] = reason
            else:
                self._monitor_problems.pop(name, None)
            first = next(iter(self._monitor_problems.items()), None)
            self._report(MONITOR, first is None, f"{first[0]}: {first[1]}" if first else "")

        try:
            await guarded(name, task, self.stats, report=problem)(self)
        finally:
            self._report(MONITOR, False, f"{name} stopped")

    # ------------------------------------------------------------ observability
    def _report(self, component: str, ok: bool, reason: str = "") -> None:
        if self.health is not None:
            self.health.report(component, ok, reason)

    def _report_scan(self, res: Resolution, node: NodeState) -> None:
        """Lifecycle health, part one: every configured PF found and readable in the last scan."""
        unread = [f"cannot read PF {m.pci_address}" for m in res.matches if m.pci_address not in node.pfs]
        self._scan_problems = [*res.problems, *unread]
        self._report_lifecycle()

    def publish_reconcile_status(self, status: dict[str, PfReconcileStatus]) -> None:
        """Store the last reconcile outcome per PF; lifecycle health follows at once."""
        self.reconcile_status = status
        self._report_lifecycle()

    def _report_lifecycle(self) -> None:
        """SERVING while every PF is found and its last reconcile did not fail. A refusal (say, a
        shrink under a VF a pod holds) is the agent keeping the node safe, so it stays SERVING."""
        failing = [f"PF {s.pf}: reconcile {s.state.value}" + (f" ({s.reason})" if s.reason else "")
                   for s in self.reconcile_status.values() if s.state.failing]
        problems = [*self._scan_problems, *failing]
        self._report(LIFECYCLE, not problems, problems[0] if problems else "")

    async def status(self) -> Mapping[str, object]:
        """The document `sriov-rdma-agent status` prints (pods from PodResources when reachable,
        at most one List call per couple of seconds however often status is asked)."""
        if self.metrics is not None:
            owners = await self.metrics.collector.refresh_pods()
        else:
            owners = await _pod_owners(self.pods)
        doc = status_document(self, owners)
        if self.health is not None:
            doc["health"] = self.health.snapshot()
        return doc

    async def start_observability(self) -> None:
        """Serve metrics, grpc health and status before any kubelet work, so probes see NOT_SERVING first."""
        if self.metrics is not None and self.settings.metrics_address:
            from agent.adapters.metrics import MetricsServer  # noqa: PLC0415 (see build_agent)

            self.metrics_server = MetricsServer(self.settings.metrics_address, self.metrics)
            await self.metrics_server.start()
        if self.health is not None:
            await self.health.start()
        if self.settings.status_socket:
            self.status_server = StatusServer(self.settings.status_socket, self.status)
            await self.status_server.start()

    async def shutdown(self) -> None:
        """Health NOT_SERVING first, then stop serving and remove our sockets. VFs are never touched."""
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        task = self._run_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if self.status_server is not None:
            await self.status_server.stop()
        if self.health is not None:
            await self.health.stop()


async def _pod_owners(pods: CachedPodDirectory | None,
                      timeout: float = 2.0) -> Mapping[tuple[str, str], PodRef] | None:
    """Who holds which device, for `status` on an agent without metrics; None when the kubelet cannot
    say (the metrics collector logs why; `status` shows pods as unknown)."""
    if pods is None:
        return None
    try:
        return await asyncio.wait_for(pods.device_owners(), timeout)
    except (AgentError, TimeoutError):
        return None


def load_config(path: str) -> Config:
    return parse_config(read_config_bytes(path))


def writes_enabled(sysfs_root: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """VFs are written only into the host's real sysfs: ``--sysfs-root`` is "/", or its ``sys/``
    is a sysfs mount (the DaemonSet mounts the host's /sys at /host/sys). A plain directory tree
    is a simulated node: writing files there would emulate nothing."""
    root = Path(sysfs_root).resolve()
    if root == Path("/"):
        return True
    target = str(root / "sys")
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) > 4 and parts[4].replace("\\040", " ") == target and rest.split(" ", 1)[0] == "sysfs":
            return True
    return False


def build_agent(settings: Settings, config: Config, writer: SysfsWriter | None = None,
                netlink: VfNetlinkPort | None = None, timeouts: Timeouts | None = None, *,
                metrics: bool = True) -> Agent:
    """The agent for a node. VFs are managed in the host's sysfs (see writes_enabled) and on a
    simulated tree when a kernel-faithful ``writer`` is given; otherwise the node is only observed.
    Config reload (inotify, SIGHUP) works either way, including changes to the resource set.

    The VF lifecycle's modules are imported here, not at the top: pyroute2 loads only when a VF
    setting needs it, and VF hygiene only where VFs are written. With ``metrics`` off (`serve` with
    no --metrics-address) prometheus_client is not loaded at all: nothing could scrape it, and its
    import is a sixth of start-up to Register and 2 MiB."""
    from agent.adapters.netlink_vf import PyrouteVfNetlink  # noqa: PLC0415
    from agent.lifecycle import Lifecycle  # noqa: PLC0415

    sysfs = SysfsHost(settings.sysfs_root, dev_root=settings.dev_root, writer=writer)
    agent = Agent(settings=settings, config=config, sysfs=sysfs,
                  ledger=PodLedger(PodResourcesClient(settings.pod_resources_socket)))
    # Scrapes and `status` see the ledger through a short cache (a burst is one List call); the
    # lifecycle and VF hygiene ask the ledger itself, which always asks the kubelet.
    agent.pods = CachedPodDirectory(agent.ledger)
    if metrics:
        from agent.adapters.metrics import build_metrics  # noqa: PLC0415

        agent.metrics = build_metrics(agent, agent.stats, sysfs, pods=agent.pods)
    agent.writes = writer is not None or writes_enabled(settings.sysfs_root)
    agent.lifecycle = Lifecycle(agent, netlink or PyrouteVfNetlink(), timeouts)
    agent.lifecycle.install()
    if agent.writes:  # a VF is reset only where the lifecycle may write
        from agent.hygiene import VfHygiene  # noqa: PLC0415

        VfHygiene(agent, agent.lifecycle.executor, agent.lifecycle.node_name).install()
    if settings.health_address:
        agent.health = HealthServer(settings.health_address)
    return agent
