"""Which VFs pods hold, judged from two witnesses: the kubelet's PodResources list and our own
Allocate record. Pure: the caller asks the kubelet and passes the answer in.

The kubelet records an allocation in PodResources only after Allocate returns, so a recent Allocate
counts as held even when PodResources does not list it yet, until PodResources has listed it once
(confirmed): from then on the kubelet's word alone says when it is released. A record PodResources
does not list (any more) is pruned once it is confirmed or older than the grace. When PodResources
cannot be asked, every record counts: the agent cannot tell a finished pod from a running one, and the
safe answer is "held".
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

# Kubelet records an allocation in PodResources only after Allocate returns: trust our own record
# for this long after an Allocate, even when PodResources answers.
ALLOCATE_GRACE_S = 60.0


@dataclass(frozen=True)
class Judgement:
    held: frozenset[str]  # VF IDs a pod holds (or may hold)
    keep: frozenset[str]  # Allocate records still worth keeping; the rest are pruned


def judge(listed: Collection[str] | None, records: Mapping[str, tuple[float, bool]], now: float,
          grace: float = ALLOCATE_GRACE_S) -> Judgement:
    """``listed``: device IDs PodResources lists (None: it could not be asked); ``records``: our
    Allocate record, device ID -> (when, time.time(); whether PodResources has listed it since)."""
    if listed is None:
        mine = frozenset(records)
        return Judgement(mine, mine)
    pods = frozenset(listed)
    pending = frozenset(d for d, (at, confirmed) in records.items() if not confirmed and now - at < grace)
    # A record the kubelet lists is kept: it is the fallback should PodResources stop answering.
    return Judgement(pods | pending, pending | (pods & records.keys()))
