"""The pod ledger against a real PodResources server on a unix socket: what counts as held when the
kubelet does not answer, and that nothing is released (so no VF is reset) until it answers again."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from agent.adapters.podresources import PodResourcesClient
from agent.services.ledger import PodLedger
from agent.sim.podresources import FakePodResources, PodDevice

RES = "nvidia.com/cx7_qsfp"
A, B = "0002:01:00.2", "0002:01:00.3"


def ledger_at(sock: Path) -> tuple[PodLedger, list[frozenset[str]]]:
    released: list[frozenset[str]] = []
    ledger = PodLedger(PodResourcesClient(str(sock), timeout=2.0))
    ledger.release_listeners.append(released.append)
    return ledger, released


def test_without_the_pod_resources_mount_our_own_record_decides(tmp_path: Path) -> None:
    ledger, _ = ledger_at(tmp_path / "not-mounted" / "kubelet.sock")
    ledger.record(RES, [A])
    assert asyncio.run(ledger.refresh()) == {A}
    assert ledger.unknown == ""  # a deployment choice, not a kubelet in trouble


def test_a_kubelet_that_does_not_answer_makes_holders_unknown_and_releases_nothing(tmp_path: Path) -> None:
    sock = tmp_path / "pod-resources" / "kubelet.sock"
    ledger, released = ledger_at(sock)
    pods = FakePodResources(str(sock))

    async def body() -> None:
        try:
            await scenario()
        finally:
            await pods.stop()

    async def scenario() -> None:
        await pods.start()
        pods.pods = [PodDevice("ml", "nccl-0", "main", RES, (A,))]  # allocated before our restart
        assert await ledger.refresh() == {A} and ledger.unknown == ""
        await pods.stop()  # the kubelet restarts: its socket is gone, the directory stays
        assert A in await ledger.refresh()
        assert "no socket" in ledger.unknown and released == []
        assert A in ledger.held()
        stale = socket.socket(socket.AF_UNIX)  # a socket file nobody listens on: a dead kubelet
        stale.bind(str(sock))
        stale.close()
        assert A in await ledger.refresh()
        assert "UNAVAILABLE" in ledger.unknown and released == []
        sock.unlink()
        await pods.start()  # back, and the pod has finished meanwhile
        pods.pods = []
        assert await ledger.refresh() == frozenset()
        assert ledger.unknown == "" and released == [frozenset({A})]

    asyncio.run(body())


def test_unknown_holders_still_count_our_own_allocations(tmp_path: Path) -> None:
    sock = tmp_path / "pod-resources" / "kubelet.sock"
    sock.parent.mkdir()
    ledger, released = ledger_at(sock)
    ledger.record(RES, [B])
    assert asyncio.run(ledger.refresh()) == {B}
    assert ledger.unknown and released == []
