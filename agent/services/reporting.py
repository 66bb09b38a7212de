"""What the grpc health endpoint says about each component, and the last reconcile per PF.

Components report here; nothing reads the agent's other state to decide: ``lifecycle`` follows
the last read of the node and the last reconcile, ``deviceplugin`` the plugin servers,
``monitor`` the event watchers (agent.adapters.health_server names them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from agent.adapters.health_server import LIFECYCLE, MONITOR, HealthServer
from agent.model import PfReconcileStatus


class HealthReport:
    def __init__(self, server: HealthServer | None = None) -> None:
        self.server = server  # None: no --health-address, nothing is served
        self.reconcile_status: dict[str, PfReconcileStatus] = {}  # by PF, last reconcile
        self._scan_problems: list[str] = []
        self._monitor_problems: dict[str, str] = {}  # watcher -> why it failed

    def report(self, component: str, ok: bool, reason: str = "") -> None:
        if self.server is not None:
            self.server.report(component, ok, reason)

    def snapshot(self) -> dict[str, dict[str, Any]] | None:
        return self.server.snapshot() if self.server is not None else None

    # ------------------------------------------------------------ lifecycle
    def scanned(self, problems: Sequence[str]) -> None:
        """Lifecycle health, part one: every configured PF found and readable in the last scan."""
        self._scan_problems = list(problems)
        self._report_lifecycle()

    def publish_reconcile_status(self, status: dict[str, PfReconcileStatus]) -> None:
        """Store the last reconcile outcome per PF; lifecycle health follows at once."""
        self.reconcile_status = status
        self._report_lifecycle()

    def _report_lifecycle(self) -> None:
        """SERVING while every PF is found and its last reconcile did not fail (ReconcileState.failing)."""
        failing = [f"PF {s.pf}: reconcile {s.state.value}" + (f" ({s.reason})" if s.reason else "")
                   for s in self.reconcile_status.values() if s.state.failing]
        problems = [*self._scan_problems, *failing]
        self.report(LIFECYCLE, not problems, problems[0] if problems else "")

    # ------------------------------------------------------------ monitor
    def monitors_started(self) -> None:
        self.report(MONITOR, not self._monitor_problems)

    def monitor(self, name: str) -> Callable[[str], None]:
        """The guard's report callback for one watcher: a failure turns ``monitor`` NOT_SERVING with
        its reason until the retried watcher runs again."""
        def problem(reason: str) -> None:
            if reason:
                self._monitor_problems[name] = reason
            else:
                self._monitor_problems.pop(name, None)
            first = next(iter(self._monitor_problems.items()), None)
            self.report(MONITOR, first is None, f"{first[0]}: {first[1]}" if first else "")
        return problem

    def monitor_stopped(self, name: str) -> None:
        self.report(MONITOR, False, f"{name} stopped")
