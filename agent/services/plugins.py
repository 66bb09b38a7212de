"""The device-plugin servers: one PluginLifecycle per served resource, their backends, and the
device-info files Multus reads for every VF they serve."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.adapters.deviceplugin import DevicePluginServer, DevicePluginServicer
from agent.adapters.devinfo import DevinfoDir
from agent.adapters.health_server import DEVICEPLUGIN
from agent.adapters.kubelet import PluginLifecycle
from agent.config import ResourceConfig
from agent.core.inventory import (
    NodeState,
    allocate_all,
    devinfo_files,
    devinfo_owner,
    preferred_allocation,
)
from agent.errors import AllocationError, DevinfoError
from agent.logs import ctx
from agent.model import ContainerAllocation, ResourceView
from agent.services.guard import guarded
from agent.services.resources import ResourceSet
from agent.services.views import ViewHub
from agent.stats import Stats

log = logging.getLogger(__name__)

AllocateObserver = Callable[[float, bool], None]


class NodeView(Protocol):
    """The node as last read (real: services.node.NodeInventory)."""

    @property
    def node(self) -> NodeState: ...


class AllocationRecord(Protocol):
    """Where an Allocate is recorded (real: services.ledger.PodLedger)."""

    def record(self, resource: str, ids: Iterable[str]) -> None: ...


class ResourceBackend:
    """PluginBackend for one resource: its view, Allocate and GetPreferredAllocation."""

    def __init__(self, plugins: PluginManager, resource: ResourceConfig) -> None:
        self.plugins = plugins
        self.resource = resource

    def current(self) -> tuple[int, ResourceView]:
        return self.plugins.hub.current(self.resource.resource_name)

    async def changed(self, after_version: int) -> tuple[int, ResourceView]:
        return await self.plugins.hub.changed(self.resource.resource_name, after_version)

    def allocate(self, requests: Sequence[Sequence[str]]) -> list[ContainerAllocation]:
        """All container requests of one call, or none: nothing is written or recorded for a call
        that fails, whichever container request fails it. ``resource`` follows config reloads."""
        p = self.plugins
        for ids in requests:  # the fence, not the view: a VF fenced an instant ago is not in a view yet
            for dev_id in ids:
                if dev_id in p.fences:
                    raise AllocationError(dev_id, p.fences[dev_id])
        _, view = self.current()
        results = allocate_all(self.resource, requests, view, p.inventory.node, p.dev_exists)
        p.write_devinfo(results)
        for ids in requests:
            p.ledger.record(self.resource.resource_name, ids)
        return results

    def preferred(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]:
        _, view = self.current()
        return preferred_allocation(available, must_include, size, view)


@dataclass
class _Plugin:
    """One served resource: its backend, its socket's lifecycle and the task running it."""

    backend: ResourceBackend
    lifecycle: PluginLifecycle
    task: asyncio.Task[None]


class PluginManager:
    def __init__(self, *, device_plugin_dir: str, devinfo_dir: str, resources: ResourceSet, hub: ViewHub,
                 inventory: NodeView, fences: Mapping[str, str], ledger: AllocationRecord,
                 dev_exists: Callable[[str], bool], stats: Stats,
                 report: Callable[[str, bool, str], None],
                 allocate_observer: Callable[[str], AllocateObserver] | None = None) -> None:
        self.device_plugin_dir = device_plugin_dir
        self.devinfo_dir = devinfo_dir
        self.resources = resources
        self.hub = hub
        self.inventory = inventory
        self.fences = fences
        self.ledger = ledger
        self.dev_exists = dev_exists
        self.stats = stats
        self.report = report
        self.allocate_observer = allocate_observer
        self.lifecycles: dict[str, PluginLifecycle] = {}
        self.plugins: dict[str, _Plugin] = {}  # by resource name, while running
        self.devinfo_synced: dict[str, str] | None = None  # device-info files last made to match, by name
        self.devinfo_resources: set[str] = set()  # every resource served since start
        self._tg: asyncio.TaskGroup | None = None
        self._problems: dict[str, str] = {}  # resource -> why it cannot serve

    # ------------------------------------------------------------ serving
    def start(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg
        self.sync()

    def stop(self) -> None:
        self._tg = None
        self.plugins.clear()

    def sync(self) -> None:
        """Serve exactly the configured resources (and removed ones still serving a pinned VF).

        A resource that stays keeps its server untouched: same socket, same ListAndWatch streams,
        no new Register. Only its backend's config follows the reload.
        """
        if self._tg is None:
            return
        wanted = {r.resource_name: r for r in self.resources.config.resources}
        for name, resource in self.resources.retired.items():
            wanted.setdefault(name, resource)
        for name in sorted(self.plugins.keys() - wanted.keys()):
            plugin = self.plugins.pop(name)
            plugin.task.cancel()  # PluginLifecycle.run stops its server and removes its socket
            self.lifecycles.pop(name, None)
            self.hub.drop(name)
            self._problems.pop(name, None)
            log.info("resource removed from the config: plugin server stopped", extra=ctx("config-reload",
                     resource=name))
        for name, resource in wanted.items():
            if name in self.plugins:
                self.plugins[name].backend.resource = resource
            else:
                self._start_plugin(self._tg, resource)
        self._report()

    def _start_plugin(self, tg: asyncio.TaskGroup, resource: ResourceConfig) -> None:
        name = resource.resource_name
        backend = ResourceBackend(self, resource)
        on_allocate = self.allocate_observer(name) if self.allocate_observer else None
        servicer = DevicePluginServicer(name, backend, on_allocate=on_allocate)
        sock = os.path.join(self.device_plugin_dir, resource.socket_name)
        lifecycle = PluginLifecycle(self.device_plugin_dir, name, DevicePluginServer(sock, servicer),
                                    on_registered=self._registered_counter(name),
                                    before_register=lambda: self.sync_devinfo(force=True))
        self.lifecycles[name] = lifecycle

        def problem(reason: str) -> None:
            if reason:
                self._problems[name] = reason
            else:
                self._problems.pop(name, None)
            self._report()

        # A plugin directory that cannot be created (or watched) is retried, never fatal.
        serve = guarded(f"device plugin {name}", lifecycle.run, self.stats, report=problem)
        self.plugins[name] = _Plugin(backend, lifecycle, tg.create_task(serve(), name=f"plugin-{name}"))

    def _registered_counter(self, resource: str) -> Callable[[bool], None]:
        def on_registered(ok: bool) -> None:
            if ok:
                self.stats.inc("kubelet_registrations", resource=resource)
                self._problems.pop(resource, None)
            self._report()
        return on_registered

    def _report(self) -> None:
        """Deviceplugin health: why a resource cannot serve, else which ones are not registered."""
        problems = [f"{n}: {p}" for n, p in sorted(self._problems.items())]
        waiting = sorted(name for name, lc in self.lifecycles.items() if not lc.registered)
        if problems:
            self.report(DEVICEPLUGIN, False, "; ".join(problems))
        else:
            self.report(DEVICEPLUGIN, not waiting, f"not registered with the kubelet: {', '.join(waiting)}"
                        if waiting else "")

    # ------------------------------------------------------------ device-info files
    def write_devinfo(self, allocs: Sequence[ContainerAllocation]) -> None:
        """Device-info files for Multus, written again at Allocate, mode 0444 (as the community plugin).

        Every served VF has its file already (sync_devinfo), so a failure here removes nothing: the
        call fails and records no allocation.
        """
        files = {name: content for alloc in allocs for name, content in alloc.devinfo.items()}
        try:
            DevinfoDir(self.devinfo_dir).write(files)
        except DevinfoError as e:
            raise AllocationError(",".join(files), f"cannot write device-info file: {e}") from e

    def sync_devinfo(self, force: bool = False) -> None:
        """One device-info file for every VF served, none for a VF that is not (stale files of our
        resources included, other plugins' files never touched).

        Runs whenever the views change, so before the first registration, and forced before every
        registration: after a node reboot the kubelet re-admits pods from its checkpoint without an
        Allocate, and Multus still finds each VF's file. A file that cannot be written is logged and
        retried at the next change; serving goes on.
        """
        want: dict[str, str] = {}
        served = self.resources.served()
        for resource in served:
            view = self.hub.views.get(resource.resource_name)
            if view is not None:
                want.update(devinfo_files(resource, view, self.inventory.node))
        if want == self.devinfo_synced and not force:
            return
        # A resource a reload removed stays ours: its files go with its VFs.
        self.devinfo_resources.update(r.resource_name for r in served)
        ours = devinfo_owner(sorted(self.devinfo_resources))
        result = DevinfoDir(self.devinfo_dir).sync(want, ours)
        for name in result.written:
            log.info("device-info file written", extra=ctx("devinfo-write", name))
        for name in result.removed:
            log.info("device-info file removed: its VF is not served", extra=ctx("devinfo-remove", name))
        for problem in result.problems:
            log.error("%s", problem, extra=ctx("devinfo", problem.path, reason=problem.reason))
        self.devinfo_synced = None if result.problems else want
