"""VF hygiene: a VF a pod let go of is fenced, put back to its baseline, optionally reset with an
FLR, and only then offered to the kubelet again, so no pod inherits another pod's state.

Signals (PodResources has no watch API, so events drive the asking):

* a VF netdev leaving for a pod (sriov-cni ADD): PodResources is asked once, so it confirms the
  allocation and our own Allocate record stops counting;
* a VF netdev coming home (sriov-cni DEL moves it back to the host netns: an RTM_NEWLINK, which makes
  the agent re-read sysfs) while the ledger still says a pod holds the VF: the pod is ending. The VF is
  fenced at once, so the kubelet cannot hand it out, and PodResources is asked again at growing
  intervals (50 ms doubling to 250 ms) for up to a minute until it stops listing the VF;
* any ledger refresh (a reconcile, a metrics scrape, `status`, the re-checks above) that finds a VF no
  longer held: the release itself.

A released VF whose netdev has not come home yet waits, fenced, for it. Then: FLR if the PF says
``resetOnRelease: flr``, the baseline PF-side attributes and MTU through the lifecycle's executor, and
the fence is lifted. A failure leaves the VF fenced with the reason and is retried with backoff. The
fence set is kept in --state-dir, so a restarted agent resets what the previous run left fenced.
Nothing is touched while the ledger says a pod holds the VF: such a fence is lifted without a write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from agent.adapters.executor import Executor, error_reason
from agent.adapters.fencestore import FenceStore
from agent.core.discovery import PfMatch, Resolution
from agent.core.hygiene import RESETTING, baseline_actions, retry_delay
from agent.core.inventory import NodeState
from agent.errors import AgentError
from agent.logs import ctx
from agent.model import PfInfo, VfInfo
from agent.stats import Stats

log = logging.getLogger(__name__)

# After a held VF's netdev comes home, ask PodResources again after 50 ms, doubling up to 250 ms, for
# this long; a VF the kubelet still lists after that is un-fenced (its pod kept it).
RECHECK_FIRST_S = 0.05
RECHECK_MAX_S = 0.25
RECHECK_WINDOW_S = 60.0


class NodeView(Protocol):
    """The node as last read, and a re-publication of its views (real: services.node.NodeInventory)."""

    @property
    def node(self) -> NodeState: ...

    @property
    def resolution(self) -> Resolution: ...

    async def refresh_links(self, reason: str) -> None: ...


class Holdings(Protocol):
    """Which VFs pods hold (real: services.ledger.PodLedger; its releases reach ``released``)."""

    def held(self) -> frozenset[str]: ...

    async def refresh(self) -> frozenset[str]: ...


class VfHygiene:
    def __init__(self, *, state_dir: str, inventory: NodeView, ledger: Holdings, fences: dict[str, str],
                 executor: Executor, node_name: str, stats: Stats,
                 on_reset: Callable[[str, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inventory = inventory
        self.ledger = ledger
        self.fences = fences  # VF -> why it is fenced; shared with the views and Allocate
        self.executor = executor
        self.node_name = node_name
        self.stats = stats
        self.on_reset = on_reset  # (resetOnRelease mode, seconds fenced) of each successful reset
        self.clock = clock
        self.store = FenceStore(state_dir)
        self.jobs: dict[str, asyncio.Task[None]] = {}
        self.fenced_at: dict[str, float] = {}  # VF -> when it was fenced (reset duration counts from here)
        self._pf: dict[str, str] = {}  # fenced VF -> its PF (kept on disk)
        self._todo: set[str] = set()  # released (or left fenced at start): a reset job is due
        self._watch: dict[str, float] = {}  # held VF whose netdev came home -> give up asking at
        self._recheck_at: float | None = None
        self._recheck_delay = RECHECK_FIRST_S
        self._away: set[str] = set()  # held VFs whose netdev is in a pod's netns
        self._had_netdev: set[str] = set()  # VFs seen with a host netdev (their driver makes one)
        self._moved = asyncio.Event()  # replaced at each node re-read; jobs waiting for a netdev wait on it
        self._wake = asyncio.Event()
        self._dirty = False  # fences changed outside a coroutine: republish the views

    def restore(self) -> None:
        """VFs the last run left fenced are fenced again (before the first device list)."""
        for vf, pf in self.store.load().items():
            log.warning("VF left fenced by the previous run: resetting it again",
                        extra=ctx("fence", vf, pf=pf))
            self._fence(vf, pf)
            self._todo.add(vf)

    # ------------------------------------------------------------ signals
    def released(self, vfs: frozenset[str]) -> None:
        """Ledger listener: these VFs are no longer held by any pod."""
        for vf in sorted(vfs):
            self._watch.pop(vf, None)
            where = self._locate(vf)
            if where is None or _mode(where[0]) == "none":
                continue
            self._fence(vf, where[1].pci_address)
            self._todo.add(vf)
        self._wake.set()

    def node_changed(self, node: NodeState) -> None:
        """Node listener, after every sysfs re-read: which held VF netdevs came home or left again."""
        vfs = {vf.pci_address: (pf, vf) for pf in node.pfs.values() for vf in pf.vfs}
        self._had_netdev |= {a for a, (_, vf) in vfs.items() if vf.netdev is not None}
        held = self.ledger.held()
        home = {a for a in self._away if a in vfs and vfs[a][1].netdev is not None}
        away = {a for a in held if a in vfs and vfs[a][1].netdev is None and self._has_netdev(a, vfs[a][0])}
        if away - self._away:
            # A netdev moved into a pod (sriov-cni ADD): the pod started. Asking PodResources now lets it
            # confirm the Allocate, so its release is the kubelet's word, not the end of a grace period.
            self._recheck_at = self.clock()
        self._away = away
        for vf in sorted(home & held):
            where = self._locate(vf)
            if where is None or _mode(where[0]) == "none" or vf in self.fences:
                continue
            log.info("netdev of a held VF came home: fenced until PodResources releases it",
                     extra=ctx("fence", vf, pf=where[1].pci_address))
            self._fence(vf, where[1].pci_address)
            self._watch[vf] = self.clock() + RECHECK_WINDOW_S
            self._recheck_at, self._recheck_delay = self.clock(), RECHECK_FIRST_S
        for vf in [v for v in self._watch if v in self._away]:  # the pod took its netdev back
            del self._watch[vf]
            self._unfence(vf)
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()
        self._wake.set()

    # ------------------------------------------------------------ root task
    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            while True:
                timeout = None if self._recheck_at is None else max(0.0, self._recheck_at - self.clock())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                self._wake.clear()
                if self._recheck_at is not None and self.clock() >= self._recheck_at:
                    await self._recheck()
                for vf in sorted(self._todo - self.jobs.keys()):
                    self.jobs[vf] = tg.create_task(self._job(vf), name=f"reset-{vf}")
                self._todo.clear()
                if self._dirty:
                    self._dirty = False
                    await self.inventory.refresh_links("VF fence changed")

    async def _recheck(self) -> None:
        """Ask PodResources again for the VFs whose netdev came home (releases reach ``released``)."""
        held = await self.ledger.refresh()
        now = self.clock()
        for vf, until in list(self._watch.items()):
            if vf not in held:
                del self._watch[vf]
            elif now >= until:
                del self._watch[vf]
                log.warning("PodResources still lists the VF %gs after its netdev came home: its pod kept "
                            "it; fence lifted", RECHECK_WINDOW_S, extra=ctx("fence", vf))
                self._unfence(vf)
        if self._watch:
            self._recheck_at = now + self._recheck_delay
            self._recheck_delay = min(self._recheck_delay * 2, RECHECK_MAX_S)
        else:
            self._recheck_at = None

    # ------------------------------------------------------------ one VF
    async def _job(self, vf: str) -> None:
        failures = 0
        try:
            while vf in self.fences:
                where = self._locate(vf)
                if where is None:
                    log.info("fenced VF is gone from the node; nothing to reset", extra=ctx("reset", vf))
                    self._unfence(vf)
                    break
                match, pf, info = where
                mode = _mode(match)
                if mode == "none":
                    self._unfence(vf)
                    break
                if vf in await self.ledger.refresh():
                    log.warning("a pod holds the fenced VF: left untouched, fence lifted",
                                extra=ctx("reset", vf, pf=pf.pci_address))
                    self.stats.inc("vf_resets", pf=pf.pci_address, mode=mode, outcome="skipped_held")
                    self._unfence(vf)
                    break
                if info.netdev is None and self._has_netdev(vf, pf):
                    await self._moved.wait()  # its netdev is still in a pod's netns: wait for a re-read
                    continue
                try:
                    await self._reset(match, pf, info, mode)
                except AgentError as e:
                    failures += 1
                    delay = retry_delay(failures)
                    reason, _ = error_reason(e)
                    self.stats.inc("vf_resets", pf=pf.pci_address, mode=mode, outcome="failed")
                    self.fences[vf] = f"{RESETTING}: failed ({e}); retry in {delay:g}s"
                    log.error("VF reset failed (attempt %d); retry in %gs: %s", failures, delay, e,
                              extra=ctx("reset", vf, pf=pf.pci_address, reason=reason))
                    await self.inventory.refresh_links("VF reset failed")
                    await asyncio.sleep(delay)
                    continue
                seconds = self.clock() - self.fenced_at.get(vf, self.clock())
                self._unfence(vf)
                self.stats.inc("vf_resets", pf=pf.pci_address, mode=mode, outcome="ok")
                if self.on_reset is not None:
                    self.on_reset(mode, seconds)
                log.info("VF reset (%s) and offered again, %.0f ms after it was fenced", mode, seconds * 1000,
                         extra=ctx("reset", vf, pf=pf.pci_address))
            await self.inventory.refresh_links("VF offered again")
        finally:
            self.jobs.pop(vf, None)

    async def _reset(self, match: PfMatch, pf: PfInfo, vf: VfInfo, mode: str) -> None:
        if mode == "flr":
            await self.executor.flr(pf.pci_address, vf.pci_address)
        for action in baseline_actions(pf.pci_address, pf.netdev.name if pf.netdev else None, match.pf,
                                       vf.index, vf_netdev=vf.netdev.name if vf.netdev else None,
                                       node_name=self.node_name):
            await self.executor.apply(action)

    # ------------------------------------------------------------ state
    def _fence(self, vf: str, pf: str) -> None:
        if vf not in self.fences:
            self.fenced_at[vf] = self.clock()
        self.fences[vf] = RESETTING
        self._pf[vf] = pf
        self.store.save(self._pf)
        self._dirty = True
        self._wake.set()

    def _unfence(self, vf: str) -> None:
        self.fences.pop(vf, None)
        self.fenced_at.pop(vf, None)
        self._pf.pop(vf, None)
        self.store.save(self._pf)
        self._dirty = True
        self._wake.set()

    def _locate(self, vf: str) -> tuple[PfMatch, PfInfo, VfInfo] | None:
        for m in self.inventory.resolution.matches:
            pf = self.inventory.node.pfs.get(m.pci_address)
            if pf is None:
                continue
            for info in pf.vfs:
                if info.pci_address == vf:
                    return m, pf, info
        return None

    def _has_netdev(self, vf: str, pf: PfInfo) -> bool:
        """Does this VF's driver give it a netdev? Seen with one, or a sibling on the same driver has one."""
        if vf in self._had_netdev:
            return True
        driver = next((v.driver for v in pf.vfs if v.pci_address == vf), None)
        return driver is not None and any(v.netdev is not None and v.driver == driver for v in pf.vfs)


def _mode(match: PfMatch) -> str:
    """resetOnRelease of the VF's PF; an externally managed PF is never written."""
    return "none" if match.pf.externally_managed else match.pf.reset_on_release
