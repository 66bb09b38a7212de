"""Composition root: builds adapters from Settings, owns the node state, runs the root tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.adapters.deviceplugin import DevicePluginServer, DevicePluginServicer
from agent.adapters.devinfo import DevinfoDir
from agent.adapters.health_server import DEVICEPLUGIN, LIFECYCLE, MONITOR, HealthServer
from agent.adapters.kubelet import PluginLifecycle
from agent.adapters.metrics import AgentMetrics, MetricsServer, build_metrics
from agent.adapters.podresources import PodResourcesClient
from agent.adapters.sysfs import SysfsHost, SysfsWriter
from agent.config import Config, ResourceConfig, parse_config
from agent.core.discovery import Resolution, pf_problem, resolve_pfs
from agent.core.inventory import (
    NodeState,
    allocate,
    build_view,
    devinfo_files,
    devinfo_owner,
    preferred_allocation,
)
from agent.errors import AllocationError, ConfigError, DevinfoError, SysfsError
from agent.healthwatch import HealthWatch
from agent.logs import ctx
from agent.model import ContainerAllocation, PfInfo, PfReconcileStatus, ResourceView
from agent.settings import Settings
from agent.stats import Stats
from agent.status import status_document

if TYPE_CHECKING:
    from agent.adapters.executor import VfNetlinkPort

log = logging.getLogger(__name__)


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


@dataclass
class Allocation:
    """The agent's own record of an Allocate call (fallback when PodResources is unreachable)."""

    device: str
    resource: str
    at: float


class ResourceBackend:
    """PluginBackend for one resource, reading the agent's shared state."""

    def __init__(self, agent: Agent, resource: ResourceConfig) -> None:
        self.agent = agent
        self.resource = resource

    def current(self) -> tuple[int, ResourceView]:
        return self.agent.hub.current(self.resource.resource_name)

    async def changed(self, after_version: int) -> tuple[int, ResourceView]:
        return await self.agent.hub.changed(self.resource.resource_name, after_version)

    def allocate(self, ids: Sequence[str]) -> ContainerAllocation:
        _, view = self.current()
        result = allocate(self.resource, ids, view, self.agent.node, self.agent.sysfs.dev_path_exists)
        self.agent.write_devinfo(result)
        now = time.time()
        for dev_id in ids:
            self.agent.allocations[dev_id] = Allocation(dev_id, self.resource.resource_name, now)
        return result

    def preferred(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]:
        _, view = self.current()
        return preferred_allocation(available, must_include, size, view)


# Last-reconcile states that turn the "lifecycle" health service NOT_SERVING.
RECONCILE_FAILING = frozenset({"error", "hung", "not_found"})

RootTask = Callable[["Agent"], Coroutine[Any, Any, None]]


@dataclass
class Agent:
    settings: Settings
    config: Config
    sysfs: SysfsHost
    hub: ViewHub = field(default_factory=ViewHub)
    node: NodeState = field(default_factory=lambda: NodeState({}))
    resolution: Resolution = field(default_factory=lambda: Resolution((), ()))
    allocations: dict[str, Allocation] = field(default_factory=dict)
    lifecycles: dict[str, PluginLifecycle] = field(default_factory=dict)
    extra_tasks: list[RootTask] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    started_at: float = field(default_factory=time.monotonic)
    metrics: AgentMetrics | None = None
    health: HealthServer | None = None
    metrics_server: MetricsServer | None = None
    _scan_problems: list[str] = field(default_factory=list)
    health_watch: HealthWatch = field(default_factory=HealthWatch)  # link overlay, debounce, re-checks
    before_serving: list[RootTask] = field(default_factory=list)  # awaited after the first scan
    pf_listeners: list[Callable[[frozenset[str]], None]] = field(default_factory=list)  # PFs (re)appeared
    reconcile_status: dict[str, PfReconcileStatus] = field(default_factory=dict)  # by PF, last reconcile
    devinfo_synced: dict[str, str] | None = None  # device-info files last made to match, by name
    _scan_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _run_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ state
    def in_pod(self) -> set[str]:
        return set(self.allocations)

    def resolve(self) -> Resolution:
        pci = self.sysfs.list_pci()
        names = {pf.selector.pf_name for _, pf in self.config.all_pfs() if pf.selector.pf_name}
        owners = {n: self.sysfs.netdev_pci_address(n) for n in names}
        return resolve_pfs(self.config, pci, owners)

    def scan(self) -> tuple[Resolution, NodeState]:
        """Read every configured PF and its VFs from sysfs (blocking file reads; fast).

        A PF that is missing, unreadable or cannot have VFs is a problem logged once (when it
        first appears) and listed in the resolution; every other PF is still served.
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
        for problem in problems:
            if problem not in self.resolution.problems:
                log.error("%s", problem, extra=ctx("discover"))
        return Resolution(res.matches, tuple(problems)), NodeState(pfs)

    async def rescan(self, reason: str = "") -> None:
        """Re-read the node and push any change to the kubelet at once.

        The sysfs walk runs in a worker thread so link events keep reaching the kubelet while it
        runs; netlink's link state is laid over the result again when it is published, so a flip
        that happened during the walk is not undone by it.
        """
        async with self._scan_lock:
            res, node = await asyncio.to_thread(self.scan)
            node = NodeState({a: self.health_watch.overlay(pf) for a, pf in node.pfs.items()})
            before = {a for a, p in self.node.pfs.items() if p.driver}
            scanned_before = bool(self.resolution.matches or self.resolution.problems)
            self.resolution, self.node = res, node
            appeared = frozenset(a for a, p in node.pfs.items() if p.driver) - before
            if appeared and scanned_before:
                for listener in self.pf_listeners:
                    listener(appeared)
            self._report_scan(res, node)
            await self._publish_views(res, node, reason)

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
        for resource in self.config.resources:
            pfs = [node.pfs[m.pci_address] for m in res.for_resource(resource.resource_name)
                   if m.pci_address in node.pfs]
            view = self.health_watch.settle(build_view(resource, pfs, in_pod), self.stats, in_pod)
            old = self.hub.views.get(resource.resource_name)
            if await self.hub.publish(view):
                self._log_transitions(old, view, reason)
        self.sync_devinfo()

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

    def write_devinfo(self, alloc: ContainerAllocation) -> None:
        """Device-info files for Multus, written again at Allocate, mode 0444 (as the community plugin)."""
        try:
            DevinfoDir(self.settings.devinfo_dir).write(alloc.devinfo)
        except DevinfoError as e:
            raise AllocationError(",".join(alloc.devinfo), f"cannot write device-info file: {e}") from e

    def sync_devinfo(self, force: bool = False) -> None:
        """One device-info file for every VF served, none for a VF that is not (stale files of our
        resources included, other plugins' files never touched).

        Runs whenever the views change, so before the first registration, and forced before every
        registration: after a node reboot the kubelet re-admits pods from its checkpoint without an
        Allocate, and Multus still finds each VF's file. A file that cannot be written is logged and
        retried at the next change; serving goes on.
        """
        want: dict[str, str] = {}
        for resource in self.config.resources:
            view = self.hub.views.get(resource.resource_name)
            if view is not None:
                want.update(devinfo_files(resource, view, self.node))
        if want == self.devinfo_synced and not force:
            return
        ours = devinfo_owner([r.resource_name for r in self.config.resources])
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
        await self.rescan("startup")
        for hook in self.before_serving:
            await hook(self)
        async with asyncio.TaskGroup() as tg:
            for resource in self.config.resources:
                backend = ResourceBackend(self, resource)
                on_allocate = self.metrics.allocate_observer(resource.resource_name) if self.metrics else None
                servicer = DevicePluginServicer(resource.resource_name, backend, on_allocate=on_allocate)
                sock = os.path.join(self.settings.device_plugin_dir, resource.socket_name)
                lifecycle = PluginLifecycle(self.settings.device_plugin_dir, resource.resource_name,
                                            DevicePluginServer(sock, servicer),
                                            on_registered=self._registered_counter(resource.resource_name),
                                            before_register=lambda: self.sync_devinfo(force=True))
                self.lifecycles[resource.resource_name] = lifecycle
                tg.create_task(lifecycle.run(), name=f"plugin-{resource.resource_name}")
            tg.create_task(self.health_watch.timer(self), name="health-timer")
            for task in self.extra_tasks:
                tg.create_task(self._watched(task))
            self._report(MONITOR, True)
            if ready is not None:
                ready.set()

    def _registered_counter(self, resource: str) -> Callable[[bool], None]:
        def on_registered(ok: bool) -> None:
            if ok:
                self.stats.inc("kubelet_registrations", resource=resource)
            waiting = sorted(name for name, lc in self.lifecycles.items() if not lc.registered)
            self._report(DEVICEPLUGIN, not waiting, f"not registered with the kubelet: {', '.join(waiting)}"
                         if waiting else "")
        return on_registered

    async def _watched(self, task: RootTask) -> None:
        """Run a root task (a watcher); the monitor component stops SERVING if it ever ends."""
        try:
            await task(self)
        finally:
            self._report(MONITOR, False, f"{getattr(task, '__name__', 'watcher')} stopped")

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
        failing = [f"PF {s.pf}: reconcile {s.state}" + (f" ({s.reason})" if s.reason else "")
                   for s in self.reconcile_status.values() if s.state in RECONCILE_FAILING]
        problems = [*self._scan_problems, *failing]
        self._report(LIFECYCLE, not problems, problems[0] if problems else "")

    async def status(self) -> Mapping[str, object]:
        """The document `sriov-rdma-agent status` prints (pods from PodResources when reachable)."""
        owners = await self.metrics.collector.refresh_pods() if self.metrics else None
        return status_document(self, owners)

    async def start_observability(self) -> None:
        """Serve metrics and grpc health before any kubelet work, so probes see NOT_SERVING first."""
        if self.metrics is not None and self.settings.metrics_address:
            self.metrics_server = MetricsServer(self.settings.metrics_address, self.metrics)
            await self.metrics_server.start()
        if self.health is not None:
            await self.health.start()

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
        if self.health is not None:
            await self.health.stop()


def load_config(path: str) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError("--config", path, f"cannot read: {e.strerror}") from e
    return parse_config(text)


def build_agent(settings: Settings, config: Config, writer: SysfsWriter | None = None,
                netlink: VfNetlinkPort | None = None) -> Agent:
    """The agent for a node. VFs are managed on the real host (sysfs root "/") and on a simulated
    tree when a kernel-faithful ``writer`` is given; plain file writes into a simulated tree would
    emulate nothing, so without one a simulated node is only observed (and the VF lifecycle's
    modules are not even imported: an observe-only agent starts faster and smaller)."""
    sysfs = SysfsHost(settings.sysfs_root, dev_root=settings.dev_root, writer=writer)
    agent = Agent(settings=settings, config=config, sysfs=sysfs)
    pods = PodResourcesClient(settings.pod_resources_socket)
    agent.metrics = build_metrics(agent, agent.stats, sysfs, pods=pods)
    if writer is not None or Path(settings.sysfs_root).resolve() == Path("/"):
        from agent.adapters.netlink_vf import PyrouteVfNetlink  # noqa: PLC0415
        from agent.lifecycle import Lifecycle  # noqa: PLC0415

        Lifecycle(agent, netlink or PyrouteVfNetlink(), pods=pods).install()
    if settings.health_address:
        agent.health = HealthServer(settings.health_address, status=agent.status)
    return agent
