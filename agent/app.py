"""Composition root: builds every part from Settings + Config, wires their listeners, runs the root
tasks, shuts down. The only module that knows all the parts; only the commands (cli, demo) and tests
import it. The services talk to each other through the small ports each declares.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.adapters.health_server import HealthServer
from agent.adapters.podresources import CachedPodDirectory, PodResourcesClient
from agent.adapters.status_server import StatusServer
from agent.adapters.sysfs import SysfsHost, SysfsWriter
from agent.config import Config, parse_config, read_config_bytes
from agent.core.status import PodRef
from agent.errors import AgentError
from agent.services.guard import guarded
from agent.services.healthwatch import HealthWatch
from agent.services.ledger import PodLedger
from agent.services.node import NodeInventory
from agent.services.plugins import PluginManager
from agent.services.reporting import HealthReport
from agent.services.resources import ResourceSet
from agent.services.status import StatusView
from agent.services.views import ViewHub
from agent.settings import Settings
from agent.stats import Stats

if TYPE_CHECKING:
    from agent.adapters.executor import Timeouts, VfNetlinkPort
    from agent.adapters.metrics_collector import AgentMetrics
    from agent.adapters.metrics_server import MetricsServer
    from agent.services.hygiene import VfHygiene
    from agent.services.lifecycle import Lifecycle

RootTask = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Watchers:
    """Which kernel event sources feed device health, and in which network namespace."""

    links: bool = True  # rtnetlink link events (carrier, admin state, netdevs moving)
    uevents: bool = True  # udev / kernel uevents (drivers binding, devices appearing)
    netns: str | None = None  # None: the agent's own (the host's, in the DaemonSet)


HOST_WATCHERS = Watchers()


@dataclass
class App:
    """Every part of a running agent, as build_agent wired them."""

    settings: Settings
    stats: Stats
    sysfs: SysfsHost
    resources: ResourceSet  # the config in force and the VFs a reload moved
    hub: ViewHub  # the views ListAndWatch streams
    ledger: PodLedger  # which VFs pods hold
    fences: dict[str, str]  # VF -> why it is fenced (VF hygiene)
    health_watch: HealthWatch  # link overlay, debounce, re-checks
    reporter: HealthReport  # grpc health components, last reconcile per PF
    inventory: NodeInventory  # the node as last read, published into hub
    plugins: PluginManager  # one device-plugin server per served resource, device-info files
    status: StatusView  # what `status` and the metrics read
    lifecycle: Lifecycle  # VF lifecycle and config reload (SIGHUP asks it too)
    writes: bool  # VFs are created and configured (the host's sysfs, or a faithful writer)
    tasks: tuple[RootTask, ...]  # root tasks: the lifecycle, VF hygiene, the event watchers
    hygiene: VfHygiene | None = None  # only where VFs are written
    metrics: AgentMetrics | None = None  # None where nothing is served: prometheus_client not loaded
    health: HealthServer | None = None
    metrics_server: MetricsServer | None = None
    status_server: StatusServer | None = None
    _run_task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Read the node, reconcile (bounded wait), then serve every resource and run the root tasks."""
        self._run_task = asyncio.current_task()
        await guarded("startup scan", self.inventory.rescan, self.stats)("startup")
        await self.lifecycle.before_serving()
        try:
            async with asyncio.TaskGroup() as tg:
                self.plugins.start(tg)
                tg.create_task(guarded("pinned VF release", self.inventory.release_pins, self.stats)(),
                               name="release-pins")
                for task in self.tasks:
                    tg.create_task(self._watched(task))
                self.reporter.monitors_started()
                if ready is not None:
                    ready.set()
        finally:
            self.plugins.stop()

    async def _watched(self, task: RootTask) -> None:
        """Run a root task (a watcher) under the guard: a failure turns the monitor component
        NOT_SERVING with its reason until the retried watcher runs again."""
        name = getattr(task, "__qualname__", "watcher").replace(".<locals>", "")
        try:
            await guarded(name, task, self.stats, report=self.reporter.monitor(name))()
        finally:
            self.reporter.monitor_stopped(name)

    async def start_observability(self) -> None:
        """Serve metrics, grpc health and status before any kubelet work, so probes see NOT_SERVING first."""
        if self.metrics is not None and self.settings.metrics_address:
            from agent.adapters.metrics_server import MetricsServer  # noqa: PLC0415 (see build_agent)

            self.metrics_server = MetricsServer(self.settings.metrics_address, self.metrics)
            await self.metrics_server.start()
        if self.health is not None:
            await self.health.start()
        if self.settings.status_socket:
            self.status_server = StatusServer(self.settings.status_socket, self.status.document)
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


async def _pod_owners(pods: CachedPodDirectory,
                      timeout: float = 2.0) -> Mapping[tuple[str, str], PodRef] | None:
    """Who holds which device, for `status` on an agent without metrics; None when the kubelet cannot
    say (`status` shows pods as unknown)."""
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
                metrics: bool = True, watchers: Watchers | None = None) -> App:
    """The agent for a node. VFs are managed in the host's sysfs (see writes_enabled) and on a
    simulated tree when a kernel-faithful ``writer`` is given; otherwise the node is only observed.
    Config reload (inotify, SIGHUP) works either way, including changes to the resource set.
    ``watchers``: the kernel event sources that feed device health (`serve`: HOST_WATCHERS; None:
    none, the node changes only when something asks for a rescan).

    The VF lifecycle's modules are imported here, not at the top: pyroute2 loads only when a VF
    setting needs it, and VF hygiene only where VFs are written. With ``metrics`` off (`serve` with
    no --metrics-address) prometheus_client is not loaded at all: nothing could scrape it, and its
    import is a sixth of start-up to Register and 2 MiB."""
    from agent.adapters.executor import Executor  # noqa: PLC0415
    from agent.adapters.netlink_vf import PyrouteVfNetlink  # noqa: PLC0415
    from agent.services.lifecycle import Lifecycle  # noqa: PLC0415

    stats = Stats()
    sysfs = SysfsHost(settings.sysfs_root, dev_root=settings.dev_root, writer=writer)
    resources = ResourceSet(config)
    hub = ViewHub()
    ledger = PodLedger(PodResourcesClient(settings.pod_resources_socket))
    fences: dict[str, str] = {}
    health = HealthServer(settings.health_address) if settings.health_address else None
    reporter = HealthReport(health)
    health_watch = HealthWatch(stats=stats)
    inventory = NodeInventory(reader=sysfs, resources=resources, hub=hub, links=health_watch, ledger=ledger,
                              fences=fences, stats=stats, sink=reporter)
    plugins = PluginManager(device_plugin_dir=settings.device_plugin_dir, devinfo_dir=settings.devinfo_dir,
                            resources=resources, hub=hub, inventory=inventory, fences=fences, ledger=ledger,
                            dev_exists=sysfs.dev_path_exists, stats=stats, report=reporter.report)
    status = StatusView(resources=resources, inventory=inventory, hub=hub, fences=fences, ledger=ledger,
                        lifecycles=plugins.lifecycles, report=reporter)
    # Scrapes and `status` see the ledger through a short cache (a burst is one List call); the
    # lifecycle and VF hygiene ask the ledger itself, which always asks the kubelet.
    pods = CachedPodDirectory(ledger)
    agent_metrics = None
    if metrics:
        from agent.adapters.metrics_collector import build_metrics  # noqa: PLC0415

        agent_metrics = build_metrics(status, stats, sysfs, pods=pods)
        status.owners = agent_metrics.collector.refresh_pods
        plugins.allocate_observer = agent_metrics.allocate_observer
    else:
        status.owners = functools.partial(_pod_owners, pods)
    writes = writer is not None or writes_enabled(settings.sysfs_root)
    executor = Executor(sysfs, netlink or PyrouteVfNetlink(), timeouts)
    lifecycle = Lifecycle(settings=settings, resources=resources, node=inventory, executor=executor,
                          ledger=ledger, sink=reporter, stats=stats, writes=writes)

    inventory.published_listeners.append(plugins.sync_devinfo)
    inventory.resources_listeners.append(plugins.sync)
    tasks: list[RootTask] = [health_watch.timer_task(inventory), lifecycle.run]
    if writes:
        inventory.pf_listeners.append(lifecycle.pfs_appeared)
    hygiene = None
    if writes:  # a VF is reset only where the lifecycle may write
        from agent.services.hygiene import VfHygiene  # noqa: PLC0415

        on_reset = None
        if agent_metrics is not None:
            resets = agent_metrics.reset_seconds
            on_reset = lambda mode, seconds: resets.labels(mode).observe(seconds)  # noqa: E731
        hygiene = VfHygiene(state_dir=settings.state_dir, inventory=inventory, ledger=ledger, fences=fences,
                            executor=executor, node_name=lifecycle.node_name, stats=stats, on_reset=on_reset)
        inventory.node_listeners.append(hygiene.node_changed)
        ledger.release_listeners.append(hygiene.released)
        hygiene.restore()
        tasks.append(hygiene.run)
    if watchers is not None:
        if watchers.links:
            tasks.append(health_watch.link_task(inventory, netns=watchers.netns))
        if watchers.uevents:
            tasks.append(health_watch.uevent_task(inventory, netns=watchers.netns))
    return App(settings=settings, stats=stats, sysfs=sysfs, resources=resources, hub=hub, ledger=ledger,
               fences=fences, health_watch=health_watch, reporter=reporter, inventory=inventory,
               plugins=plugins, status=status, lifecycle=lifecycle, writes=writes, tasks=tuple(tasks),
               hygiene=hygiene, metrics=agent_metrics, health=health)
