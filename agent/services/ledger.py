"""The one answer to "which VFs do pods hold", for health, the lifecycle, status and VF hygiene.

PodResources first (the kubelet's own word), our Allocate record as the fallback and for the
moments before the kubelet lists an allocation; the rule itself is ``agent.core.ledger.judge``.
Every refresh prunes stale records and tells the release listeners which VFs stopped being held,
whoever asked (a reconcile, a metrics scrape, `status`, or VF hygiene after a netdev came home).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from agent.adapters.podresources import PodResourcesUnavailableError
from agent.core.ledger import ALLOCATE_GRACE_S, judge
from agent.core.status import PodDirectory, PodRef
from agent.errors import AgentError, shorten
from agent.logs import ctx

log = logging.getLogger(__name__)

Owners = Mapping[tuple[str, str], PodRef]


@dataclass
class Allocation:
    """The agent's own record of an Allocate call (fallback when PodResources is unreachable)."""

    device: str
    resource: str
    at: float  # time.time()
    confirmed: bool = False  # PodResources has listed it: its word alone decides the release now


@dataclass
class PodLedger:
    pods: PodDirectory | None = None  # None: no kubelet to ask (the record is all there is)
    records: dict[str, Allocation] = field(default_factory=dict)
    clock: Callable[[], float] = time.time
    grace: float = ALLOCATE_GRACE_S
    release_listeners: list[Callable[[frozenset[str]], None]] = field(default_factory=list)
    owners: Owners | None = None  # PodResources' last answer; None when it could not be asked
    error: AgentError | None = None  # why it could not
    unknown: str = ""  # why pod holders are unknown now ("" when PodResources answered or is not deployed)
    _listed: frozenset[str] | None = None
    _held: frozenset[str] = frozenset()  # as of the last refresh: what a release is measured against
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def record(self, resource: str, ids: Iterable[str]) -> None:
        now = self.clock()
        for dev_id in ids:
            self.records[dev_id] = Allocation(dev_id, resource, now)

    def held(self) -> frozenset[str]:
        """Held now, by the last PodResources answer and the current record (no kubelet call)."""
        return self._sticky(judge(self._listed, self._times(), self.clock(), self.grace).held)

    def _sticky(self, held: frozenset[str]) -> frozenset[str]:
        """While PodResources is deployed but does not answer, nothing is released: a VF it listed
        last time may still be in a running pod, and our own record cannot say otherwise."""
        return held | self._held if self.unknown else held

    async def refresh(self) -> frozenset[str]:
        """Ask PodResources, prune the record, tell listeners what was released; return what is held."""
        async with self._lock:
            await self._ask()
            j = judge(self._listed, self._times(), self.clock(), self.grace)
            for dev_id in [d for d in self.records if d not in j.keep]:
                del self.records[dev_id]
            held = self._sticky(j.held)
            released, self._held = self._held - held, held
        if released:
            log.info("released by their pods: %s", ", ".join(sorted(released)), extra=ctx("release"))
            for listener in self.release_listeners:
                listener(released)
        return held

    async def device_owners(self) -> Owners:
        """PodDirectory for metrics and status, answered through the ledger so every ask prunes."""
        await self.refresh()
        if self.owners is None:
            raise self.error or PodResourcesUnavailableError("", "not configured")
        return self.owners

    async def _ask(self) -> None:
        if self.pods is None:
            self.owners, self._listed = None, None
            return
        try:
            owners = await self.pods.device_owners()
        except AgentError as e:
            # No pod-resources directory is a deployment without the mount: our own record is all
            # there is. A directory without a socket (the kubelet re-creating it) or a socket that does
            # not answer is a kubelet in trouble: which VFs pods hold is unknown until it answers.
            deployed = (not isinstance(e, PodResourcesUnavailableError)
                        or os.path.isdir(os.path.dirname(e.socket)))
            if self.owners is not None or self.error is None:
                log.log(logging.WARNING if deployed else logging.INFO,
                        "PodResources unavailable (%s); %s", e,
                        "no VF is released or destroyed until it answers" if deployed
                        else "using the agent's own Allocate record", extra=ctx("pod-resources"))
            self.owners, self._listed, self.error = None, None, e
            self.unknown = shorten(str(e), 200) if deployed else ""
            return
        self.owners, self.error, self.unknown = owners, None, ""
        self._listed = frozenset(dev for _, dev in owners)
        for dev_id in self._listed & self.records.keys():
            self.records[dev_id].confirmed = True

    def _times(self) -> dict[str, tuple[float, bool]]:
        return {d: (a.at, a.confirmed) for d, a in self.records.items()}
