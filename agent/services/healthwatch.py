"""Between the kernel's device events and the agent's views.

The link watcher (netlink) and the uevent watcher (udev / kernel uevents) feed this; each event
that concerns a served device triggers a rescan of the node (services.node.NodeInventory, through
the ``NodeRefresher`` port), which reads sysfs, overlays netlink's
link state (``overlay``) and debounces recoveries (``settle``) before the views are published to
the ListAndWatch streams. One timer task re-reads the node when a recovery has settled and a
little after each link event, because mlx5 moves the RoCE port to ACTIVE shortly after carrier
returns and that transition has no event of its own. Every callback runs under agent.guard:
a rescan that raises is logged and retried with backoff, and the watcher that delivered the
event goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from agent.adapters.netlink import DEFAULT_RESYNC_S, Links, LinkWatcher
from agent.adapters.udev import DeviceEvent, Source, UeventWatcher, describe
from agent.core.health import (
    DEFAULT_SETTLE_S,
    Debounce,
    LinkObservation,
    fold,
    link_matters,
    link_state_only,
    with_links,
)
from agent.model import PfInfo, ResourceView
from agent.services.guard import guarded
from agent.stats import Stats

# Re-read RDMA port state this long after the latest link or device event (seconds).
FOLLOW_UP_S = (0.5, 2.0)
# A failed read of the node is tried again after 0.5 s, doubling up to 30 s while it keeps failing.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0

Task = Callable[[], Coroutine[Any, Any, None]]


class NodeRefresher(Protocol):
    """What events ask of the node (real: services.node.NodeInventory)."""

    async def rescan(self, reason: str = "") -> None: ...

    async def refresh_links(self, reason: str) -> None: ...

    def watched_names(self) -> set[str]: ...


@dataclass
class HealthWatch:
    stats: Stats = field(default_factory=Stats)
    settle_s: float = DEFAULT_SETTLE_S
    clock: Callable[[], float] = time.monotonic
    links: dict[str, LinkObservation] = field(default_factory=dict)  # netlink's latest word, by name
    debounce: dict[str, Debounce] = field(default_factory=dict)  # per resource
    deadlines: set[float] = field(default_factory=set)  # a pending recovery becomes reportable
    rereads: set[float] = field(default_factory=set)  # read sysfs again (RDMA port state)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    # ------------------------------------------------------------ used by each rescan
    def overlay(self, pf: PfInfo) -> PfInfo:
        return with_links(pf, self.links)

    def settle(self, view: ResourceView, stats: Stats, held: Collection[str] = ()) -> ResourceView:
        """Debounce one resource's observed view; count flips; arm the timer for pending recoveries.

        ``held``: devices allocated to pods, kept listed (Unhealthy) if they vanish.
        """
        # settle_s follows the config (hot-reloaded); pending recoveries use the current value.
        state = self.debounce.get(view.resource_name, Debounce(self.settle_s))
        state = replace(state, settle_s=self.settle_s)
        state, settled, flipped = fold(state, view, self.clock(), held)
        self.debounce[view.resource_name] = state
        by_id = settled.by_id()
        for dev_id in flipped:
            stats.inc("health_transitions", resource=view.resource_name, to=by_id[dev_id].health.value)
        deadline = state.next_deadline()
        if deadline is not None:
            self._at(deadline)
        return settled

    # ------------------------------------------------------------ event handlers
    async def on_links(self, node: NodeRefresher, before: Links, after: Links, reason: str) -> None:
        self.links = {o.name: o for o in after.values()}
        watched = node.watched_names()
        changed = [i for i in before.keys() | after.keys()
                   if link_matters(before.get(i), after.get(i), watched)]
        if not changed:
            return
        if all(link_state_only(before.get(i), after.get(i)) for i in changed):
            await node.refresh_links(reason)  # carrier/admin flip: no sysfs walk on the hot path
            if any(_came_up(before.get(i), after.get(i)) or _came_up(after.get(i), before.get(i))
                   for i in changed):
                # The RoCE port follows its netdev a moment later, both ways (a VF netdev going down
                # takes the VF's port DOWN; only sysfs shows it): read it again.
                self._follow_up()
        else:
            await node.rescan(reason)
            self._follow_up()

    async def on_uevents(self, node: NodeRefresher, events: list[DeviceEvent], overflowed: bool) -> None:
        watched = node.watched_names()
        if overflowed or any(e.matters(watched) for e in events):
            await node.rescan("uevent queue overflowed" if overflowed else describe(events))
            self._follow_up()

    # ------------------------------------------------------------ root tasks
    def link_task(self, node: NodeRefresher, netns: str | None = None,
                  resync_s: float = DEFAULT_RESYNC_S) -> Task:
        async def link_watcher() -> None:
            watcher = LinkWatcher(netns=netns, resync_s=resync_s, stats=self.stats)
            on_links = guarded("netlink event", self.on_links, self.stats)
            await watcher.run(lambda b, a, r: on_links(node, b, a, r))
        return link_watcher

    def uevent_task(self, node: NodeRefresher, source: Source | None = None,
                    netns: str | None = None) -> Task:
        async def uevent_watcher() -> None:
            watcher = UeventWatcher(source=source, netns=netns, stats=self.stats)
            on_uevents = guarded("uevent", self.on_uevents, self.stats)
            await watcher.run(lambda evs, over: on_uevents(node, evs, over))
        return uevent_watcher

    def timer_task(self, node: NodeRefresher) -> Task:
        async def timer() -> None:
            await self.timer(node)
        return timer

    async def timer(self, node: NodeRefresher) -> None:
        """At each deadline: re-read sysfs (follow-ups), or just re-judge (a recovery settled)."""
        rescan = guarded("timer rescan", node.rescan, self.stats)
        refresh = guarded("timer refresh", node.refresh_links, self.stats)
        while True:
            upcoming = min(self.deadlines | self.rereads, default=None)
            timeout = None if upcoming is None else max(0.0, upcoming - self.clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            now = self.clock()
            reread = {d for d in self.rereads if d <= now}
            settled = {d for d in self.deadlines if d <= now}
            self.rereads -= reread
            self.deadlines -= settled
            if reread:
                await rescan("re-read after a link or device event")
            elif settled:
                await refresh("recovery settled")

    def retry(self, failures: int) -> float:
        """Re-read sysfs later: the last read failed, the ``failures``-th time in a row. Returns the delay."""
        delay: float = min(RETRY_FIRST_S * 2.0 ** min(failures - 1, 16), RETRY_MAX_S)
        self.rereads.add(self.clock() + delay)
        self._wake.set()
        return delay

    def _follow_up(self) -> None:
        """Re-read sysfs FOLLOW_UP_S after the latest event; a storm of events postpones them."""
        now = self.clock()
        self.rereads = {now + delay for delay in FOLLOW_UP_S}
        self._wake.set()

    def _at(self, deadline: float) -> None:
        if deadline not in self.deadlines:
            self.deadlines.add(deadline)
            self._wake.set()


def _came_up(before: LinkObservation | None, after: LinkObservation | None) -> bool:
    def usable(o: LinkObservation | None) -> bool:
        return o is not None and o.admin_up and o.carrier
    return usable(after) and not usable(before)
