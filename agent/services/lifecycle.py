"""VF lifecycle: observe the node, plan (agent.core.reconcile), apply (executor), report, repeat.

A reconcile runs before the agent starts serving, again when the config file changes and when a
configured PF (re)appears. It keeps no state on disk: every reconcile starts from what the kernel
shows, so a rebooted node (sriov_numvfs back to 0) is rebuilt from the config alone. All kernel
work runs in worker threads; the event loop keeps serving ListAndWatch and health throughout.
The config watcher runs whether or not VFs may be written (a simulated node is only observed):
a reload always applies the resource set to the served plugins.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from agent.adapters.executor import Executor, error_reason
from agent.adapters.inotify import IN_CLOSE_WRITE, IN_CREATE, IN_DELETE, IN_MOVED_TO, Inotify
from agent.config import Config, parse_config, read_config_bytes
from agent.core.discovery import Resolution
from agent.core.inventory import NodeState
from agent.core.reconcile import (
    Action,
    Desired,
    Observed,
    PfDesired,
    Refuse,
    Warn,
    mutates,
    plan,
)
from agent.errors import AgentError, ConfigError, SysfsError
from agent.logs import ctx
from agent.model import PfReconcileStatus, ReconcileState
from agent.services.guard import guarded
from agent.services.node import LinkReader
from agent.settings import Settings
from agent.stats import Stats

log = logging.getLogger(__name__)

HOLDERS_UNKNOWN = "holders_unknown"  # a refusal/warning the planner gives while PodResources does not answer
UNKNOWN_RETRY_S = 2.0
UNKNOWN_RETRY_MAX_S = 60.0


@dataclass
class _Run:
    """What one reconcile did, PF by PF."""

    applied: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # PF -> (reason, message)
    notes: dict[str, Refuse | Warn] = field(default_factory=dict)  # PF -> its refusal or first warning
    seen: set[Refuse | Warn] = field(default_factory=set)  # reported already (each round plans them again)


class ConfigSource(Protocol):
    """The config in force, and where a reloaded one goes (real: services.resources.ResourceSet)."""

    @property
    def config(self) -> Config: ...

    def set_config(self, new: Config) -> None: ...


class NodeObserver(Protocol):
    """One read of the node (resolution + observation), published as the kubelet's views, and a plain
    re-read (real: services.node.NodeInventory)."""

    async def observe(self, reason: str, links: LinkReader, timeout: float, *,
                      adopt: bool = True) -> tuple[Resolution, NodeState]: ...

    async def rescan(self, reason: str = "") -> None: ...


class Holdings(Protocol):
    """Which VFs pods hold, asked of the kubelet now (real: services.ledger.PodLedger)."""

    @property
    def unknown(self) -> str:
        """Why holders are unknown after the last refresh ("" when PodResources answered)."""
        ...

    async def refresh(self) -> frozenset[str]: ...


class ReconcileSink(Protocol):
    """Where each reconcile's outcome goes (real: services.reporting.HealthReport)."""

    def publish_reconcile_status(self, status: dict[str, PfReconcileStatus]) -> None: ...


class Lifecycle:
    def __init__(self, *, settings: Settings, resources: ConfigSource, node: NodeObserver, executor: Executor,
                 ledger: Holdings, sink: ReconcileSink, stats: Stats, writes: bool,
                 startup_wait: float = 30.0, max_rounds: int = 4) -> None:
        self.settings = settings
        self.resources = resources
        self.node = node
        self.executor = executor
        self.ledger = ledger
        self.sink = sink
        self.stats = stats
        self.writes = writes  # VFs are created and configured (the host's sysfs, or a faithful writer)
        self._timeouts = self.executor.timeouts  # before the config's lifecycle: section is applied
        self.startup_wait = startup_wait
        self.max_rounds = max_rounds
        self.config_error = ""  # why the last config reload was rejected ("" when it was accepted)
        self._config_bytes = _read_bytes(settings.config)
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._reasons: list[str] = []
        self._first: asyncio.Task[None] | None = None
        self._config_changed = False
        self._unknown_retries = 0  # reconciles in a row held back because pod holders were unknown
        self._retry: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ triggers
    def trigger(self, reason: str) -> None:
        self._reasons.append(reason)
        self._wake.set()

    def pfs_appeared(self, pfs: frozenset[str]) -> None:
        """A configured PF (re)appeared (a driver bound, a hot-plug): reconcile it."""
        self.trigger(f"PF appeared: {', '.join(sorted(pfs))}")

    async def before_serving(self) -> None:
        """The startup reconcile; serving starts when it is done or after ``startup_wait`` at most.
        With writes off there is nothing to reconcile (and that is said once)."""
        if not self.writes:
            log.info("VF writes are off: --sysfs-root %s is not the host's sysfs, so VFs are only observed; "
                     "config changes still apply to the served resources", self.settings.sysfs_root,
                     extra=ctx("startup"))
            return
        self._first = asyncio.create_task(self.guarded("startup"), name="reconcile-startup")
        wait = self.resources.config.lifecycle.startup_wait_s or self.startup_wait
        done, _ = await asyncio.wait({self._first}, timeout=wait)
        if not done:
            log.warning("startup reconcile still running after %gs; serving meanwhile", wait,
                        extra=ctx("reconcile"))

    async def run(self) -> None:
        """Root task: finish the startup reconcile, then reconcile on config change and PF re-appearance."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.watch_config(), name="config-watch")  # a change during start-up counts
            if self._first is not None:
                await self._first
            while True:
                await self._wake.wait()
                self._wake.clear()
                reasons, self._reasons = self._reasons, []
                why = "; ".join(dict.fromkeys(reasons))
                if self._config_changed:
                    self._config_changed = False
                    # Resource set first (plugin servers, pinned VFs), then the VFs themselves.
                    await guarded("apply config", self.node.rescan, self.stats)("config changed")
                if self.writes:
                    await self.guarded(why)

    async def guarded(self, trigger: str) -> None:
        """A reconcile whose unexpected failure is logged, counted and retried with backoff; serving
        goes on either way."""
        await guarded("reconcile", self.reconcile, self.stats)(trigger)

    # ------------------------------------------------------------ config hot-reload
    async def watch_config(self) -> None:
        """inotify on the config's directory: a ConfigMap update is an atomic ``..data`` symlink swap."""
        path = Path(self.settings.config)
        ino = Inotify()
        try:
            try:
                ino.watch(str(path.parent), IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE | IN_DELETE)
            except SysfsError as e:
                log.error("config hot-reload disabled: %s", e, extra=ctx("config-reload", str(path)))
                await asyncio.Event().wait()
            reload = guarded("config reload", self._reload_event, self.stats)
            # The event generator is closed before the fd it reads, whatever ends the loop.
            async with contextlib.aclosing(ino.events()) as events:
                async for ev in events:
                    if ev.name in (path.name, "..data"):
                        await reload()
        finally:
            ino.close()

    async def _reload_event(self) -> None:
        await self.reload_config()

    async def reload_config(self, force: bool = False) -> bool:
        """Re-read the config file; adopt it if it is new (or ``force``, for SIGHUP) and valid.
        False when it was rejected (the last good config stays in force).

        Reading and parsing run in a worker thread: the file is bounded (agent.config), but even a
        large one must not stall health answers and ListAndWatch streams.
        """
        path = self.settings.config
        try:
            new = await asyncio.to_thread(self._read_new_config, path, force)
        except ConfigError as e:
            self.config_error = str(e)
            self.stats.inc("config_reloads", result="invalid")
            log.error("new config rejected; keeping the last good one: %s", e,
                      extra=ctx("config-reload", path))
            return False
        if new is None:
            return True
        self.config_error = ""
        self.stats.inc("config_reloads", result="ok")
        old_names = {r.resource_name for r in self.resources.config.resources}
        new_names = {r.resource_name for r in new.resources}
        if old_names != new_names:
            log.info("resources change (%s -> %s): applying live; unchanged resources are not disturbed",
                     sorted(old_names), sorted(new_names), extra=ctx("config-reload", path))
        self.resources.set_config(new)
        log.info("config reloaded", extra=ctx("config-reload", path))
        self._config_changed = True
        self.trigger("config changed")
        return True

    def _read_new_config(self, path: str, force: bool = False) -> Config | None:
        """The file's config when its bytes changed since the last read (or ``force``); None when
        unchanged or gone (a ConfigMap update swaps a symlink; a file removed for a moment is not an
        error, except to a SIGHUP that asked for it)."""
        if not os.path.exists(path) and not force:
            return None
        data = read_config_bytes(path)
        if data == self._config_bytes and not force:
            return None
        self._config_bytes = data  # a rejected file is reported once, not on every event
        return parse_config(data)

    # ------------------------------------------------------------ reconcile
    async def reconcile(self, trigger: str) -> None:
        """Plan and apply until the node matches the config (or only refusals are left)."""
        async with self._lock:
            started = time.monotonic()
            config = self.resources.config
            t, base = config.lifecycle, self._timeouts
            self.executor.timeouts = replace(base, sysfs_write=t.sysfs_write_s or base.sysfs_write,
                                             vf_wait=t.vf_wait_s or base.vf_wait)
            res, node = await self.observe()
            desired = self.desired(config, res)
            run = _Run()
            observed = Observed({})
            todo: list[Action] = []
            for _ in range(self.max_rounds):
                held = await self.ledger.refresh()
                observed = Observed({p.pci_address: node.pfs[p.pci_address] for p in desired.pfs
                                     if p.pci_address in node.pfs}, held, self.ledger.unknown)
                live = Desired(tuple(p for p in desired.pfs if p.pci_address not in run.failed))
                actions = plan(live, observed)
                self._note(actions, run)
                todo = [a for a in actions if not isinstance(a, Refuse | Warn)]
                if not todo:
                    break
                await self._apply(todo, run)
                _, node = await self.observe()  # the next round's observation, published at once
            else:
                for a in todo:
                    run.failed.setdefault(a.pf, ("not_converged", f"still to do: {a.describe()}"))
            self._publish(config, res, desired, observed, run)
            self._retry_while_unknown(run)
            total = sum(run.applied.values())
            if total or run.failed:
                log.info("reconcile done (%s): %d change(s), %d PF(s) failing, %.0f ms", trigger, total,
                         len(run.failed), (time.monotonic() - started) * 1000, extra=ctx("reconcile"))

    def _retry_while_unknown(self, run: _Run) -> None:
        """PodResources has no watch: while a change waits for it to say which VFs pods hold, ask
        again after 2 s, doubling to 60 s. Nothing is scheduled once it answers."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if not any(a.reason == HOLDERS_UNKNOWN for a in run.seen):
            self._unknown_retries = 0
            return
        delay = min(UNKNOWN_RETRY_MAX_S, UNKNOWN_RETRY_S * 2 ** self._unknown_retries)
        self._unknown_retries += 1
        self._retry = asyncio.get_running_loop().call_later(delay, self.trigger, "asking PodResources again")

    async def _apply(self, todo: Sequence[Action], run: _Run) -> None:
        applied, failed = run.applied, run.failed
        for action in todo:
            if action.pf in failed:
                continue
            try:
                await self.executor.apply(action)
            except AgentError as e:
                reason, hint = error_reason(e)
                message = f"{e}; {hint}" if hint else str(e)
                failed[action.pf] = (reason, message)
                self.stats.inc("reconcile_errors", pf=action.pf, reason=reason)
                log.error("%s failed: %s", action.describe(), message,
                          extra=ctx("reconcile", action.pf, pf=action.pf, reason=reason))
                continue
            if mutates(action):
                applied[action.pf] += 1
                self.stats.inc("reconcile_actions", pf=action.pf, action=action.kind)
            log.info("%s", action.describe(), extra=ctx(action.kind, action.pf, pf=action.pf))

    def _note(self, actions: Iterable[Action], run: _Run) -> None:
        """Log each refusal and warning once per reconcile; refusals also count as errors."""
        notes = run.notes
        for a in actions:
            if not isinstance(a, Refuse | Warn) or a in run.seen:
                continue
            run.seen.add(a)
            if isinstance(a, Refuse):
                self.stats.inc("reconcile_errors", pf=a.pf, reason=a.reason)
                log.error("refused: %s", a.message, extra=ctx("reconcile", a.pf, pf=a.pf, reason=a.reason))
            else:
                log.warning("%s", a.message, extra=ctx("reconcile", a.pf, pf=a.pf, reason=a.reason))
            if a.pf not in notes or isinstance(a, Refuse):
                notes[a.pf] = a

    @functools.cached_property
    def node_name(self) -> str:
        """Seeds stable MACs; the host name (hostNetwork) when --node-name is not set, never ""."""
        return self.settings.node_name or socket.gethostname()

    def desired(self, config: Config, res: Resolution) -> Desired:
        rdma = {r.resource_name: r.rdma for r in config.resources}
        return Desired(tuple(
            PfDesired(m.pci_address, m.resource.resource_name, m.pf, rdma.get(m.resource.resource_name, True),
                      self.node_name)
            for m in res.matches))

    async def observe(self, reason: str = "reconcile", *, adopt: bool = True) -> tuple[Resolution, NodeState]:
        """One read of the node for a round: sysfs with rtnetlink and devlink, one resolution."""
        return await self.node.observe(reason, self.executor.netlink, self.executor.timeouts.netlink,
                                       adopt=adopt)

    def _publish(self, config: Config, res: Resolution, desired: Desired, observed: Observed,
                 run: _Run) -> None:
        applied, failed, notes = run.applied, run.failed, run.notes
        now = time.time()
        status: dict[str, PfReconcileStatus] = {}
        for p in desired.pfs:
            have = observed.pfs.get(p.pci_address)
            note = notes.get(p.pci_address)
            state, reason, message = ReconcileState.OK, "", ""
            if p.config.externally_managed:
                state = ReconcileState.EXTERNAL
            if note is not None:
                reason, message = note.reason, note.message
                if isinstance(note, Refuse):
                    state = ReconcileState.REFUSED
            if p.pci_address in failed:
                reason, message = failed[p.pci_address]
                state = ReconcileState.HUNG if self.executor.hung(p.pci_address) else ReconcileState.ERROR
            status[p.pci_address] = PfReconcileStatus(
                pf=p.pci_address, resource=p.resource, state=state, desired_vfs=p.config.num_vfs,
                actual_vfs=have.sriov_numvfs if have else None,
                total_vfs=have.sriov_totalvfs if have else None,
                eswitch_mode=have.eswitch_mode if have else None, reason=reason, message=message,
                actions_applied=applied.get(p.pci_address, 0), updated_at=now)
        matched = {(m.resource.resource_name, m.pf.selector) for m in res.matches}
        for r, pf in config.all_pfs():
            if (r.resource_name, pf.selector) not in matched:
                key = pf.selector.describe()
                status[key] = PfReconcileStatus(
                    pf=key, resource=r.resource_name, state=ReconcileState.NOT_FOUND, desired_vfs=pf.num_vfs,
                    reason="pf_not_found", message="no such PF on this node", updated_at=now)
        self.sink.publish_reconcile_status(status)

    async def dry_run(self) -> tuple[Action, ...]:
        """The first round of the plan for this node, computed from a real observation; nothing is written."""
        res, node = await self.observe("dry run", adopt=False)
        for problem in res.problems:
            log.error("%s", problem, extra=ctx("dry-run"))
        desired = self.desired(self.resources.config, res)
        held = await self.ledger.refresh()
        return plan(desired, Observed(node.pfs, held, self.ledger.unknown))


def _read_bytes(path: str) -> bytes | None:
    try:
        return read_config_bytes(path)
    except ConfigError:
        return None
