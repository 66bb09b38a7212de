"""Event counters: each one declared once here, counted by Stats, exported by the metrics collector.

Components count what happened (a reconcile action, a health transition, a resync); they never
talk to prometheus_client. COUNTERS is the only list of counters: the collector exports exactly
these, and ``Stats.inc`` refuses a name or a label set that is not declared, so a counter that would
never be exported fails at its first use instead of shipping silently.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from agent.errors import UndeclaredCounterError


@dataclass(frozen=True)
class CounterSpec:
    """One counter: exported as ``sriov_rdma_<name>_total`` with ``doc`` as HELP and these labels."""

    name: str
    doc: str
    labels: tuple[str, ...]


COUNTERS: Mapping[str, CounterSpec] = {c.name: c for c in (
    CounterSpec("reconcile_actions", "Changes the reconciler made, by PF and action.", ("pf", "action")),
    CounterSpec("reconcile_errors", "Reconcile steps that failed, by PF and reason.", ("pf", "reason")),
    CounterSpec("health_transitions", "VF health changes sent to the kubelet, by new health.",
                ("resource", "to")),
    CounterSpec("kubelet_registrations", "Successful Register calls to the kubelet.", ("resource",)),
    CounterSpec("vf_resets", "Resets of VFs their pods released, by PF, resetOnRelease mode and outcome "
                "(ok, failed, skipped_held).", ("pf", "mode", "outcome")),
    CounterSpec("netlink_resyncs", "Full re-reads after a netlink overflow or error, by reason.",
                ("reason",)),
    CounterSpec("callback_errors", "Event callbacks and root tasks that failed and were retried "
                "with backoff, by callback.", ("callback",)),
    CounterSpec("config_reloads", "Config file reloads, by result (ok, or invalid: rejected and the last "
                "good config kept).", ("result",)),
)}

LabelValues = tuple[str, ...]  # in the order the counter declares its labels


def label_values(name: str, labels: Mapping[str, str]) -> LabelValues:
    """``labels`` as values in declared order; UndeclaredCounterError unless ``name`` is declared with
    exactly these label names."""
    spec = COUNTERS.get(name)
    if spec is None:
        raise UndeclaredCounterError(name, tuple(labels))
    if len(labels) != len(spec.labels) or not all(k in labels for k in spec.labels):
        raise UndeclaredCounterError(name, tuple(labels), spec.labels)
    return tuple(labels[k] for k in spec.labels)


class Stats:
    def __init__(self) -> None:
        self._counts: dict[str, dict[LabelValues, float]] = {name: {} for name in COUNTERS}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = label_values(name, labels)
        counts = self._counts[name]
        counts[key] = counts.get(key, 0.0) + amount

    def get(self, name: str, **labels: str) -> float:
        key = label_values(name, labels)
        return self._counts[name].get(key, 0.0)

    def series(self, name: str) -> Iterator[tuple[LabelValues, float]]:
        """Every label set counted under ``name`` (values in declared order) with its value."""
        if name not in COUNTERS:
            raise UndeclaredCounterError(name, ())
        yield from sorted(self._counts[name].items())
