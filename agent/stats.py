"""Event counters the app keeps; the metrics collector reads them at scrape time.

Components count what happened (a reconcile action, a health transition, a resync); they never
talk to prometheus_client. Labels are plain keyword strings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

LabelSet = tuple[tuple[str, str], ...]


class Stats:
    def __init__(self) -> None:
        self._counts: Counter[tuple[str, LabelSet]] = Counter()

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self._counts[(name, tuple(sorted(labels.items())))] += amount  # type: ignore[assignment]

    def get(self, name: str, **labels: str) -> float:
        return float(self._counts.get((name, tuple(sorted(labels.items()))), 0))

    def series(self, name: str) -> Iterator[tuple[dict[str, str], float]]:
        """Every label set recorded under ``name`` with its value."""
        for (n, labels), value in sorted(self._counts.items()):
            if n == name:
                yield dict(labels), float(value)
