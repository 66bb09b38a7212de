"""The agent's state as `sriov-rdma-agent status` and the metrics collector read it: one read-only
view over the services (core.status.ObservedAgent), and the status document."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Protocol

from agent.config import Config
from agent.core.discovery import Resolution
from agent.core.inventory import NodeState
from agent.core.status import PodRef, status_document
from agent.model import PfReconcileStatus
from agent.services.ledger import PodLedger
from agent.services.node import NodeInventory
from agent.services.reporting import HealthReport
from agent.services.resources import ResourceSet
from agent.services.views import ViewHub

Owners = Mapping[tuple[str, str], PodRef]


class Registration(Protocol):
    """A resource's kubelet registration (real: adapters.kubelet.PluginLifecycle)."""

    @property
    def registered(self) -> bool: ...


class StatusView:
    """An ObservedAgent over the services that hold each piece; it copies nothing."""

    def __init__(self, *, resources: ResourceSet, inventory: NodeInventory, hub: ViewHub,
                 fences: Mapping[str, str], ledger: PodLedger, lifecycles: Mapping[str, Registration],
                 report: HealthReport) -> None:
        self.resources = resources
        self.inventory = inventory
        self.hub = hub
        self.fences = fences
        self.ledger = ledger
        self.lifecycles = lifecycles  # resource -> its registration, as the plugin manager runs them
        self.report = report
        self.owners: Callable[[], Awaitable[Owners | None]] | None = None  # who holds which VF (app wires it)

    @property
    def config(self) -> Config:
        return self.resources.config

    @property
    def node(self) -> NodeState:
        return self.inventory.node

    @property
    def resolution(self) -> Resolution:
        return self.inventory.resolution

    def held(self) -> Collection[str]:
        return self.ledger.held()

    @property
    def reconcile_status(self) -> Mapping[str, PfReconcileStatus]:
        return self.report.reconcile_status

    async def document(self) -> Mapping[str, object]:
        """The document `sriov-rdma-agent status` prints (pods from PodResources when reachable,
        at most one List call per couple of seconds however often status is asked)."""
        owners = await self.owners() if self.owners is not None else None
        doc = status_document(self, owners)
        health = self.report.snapshot()
        if health is not None:
            doc["health"] = health
        return doc
