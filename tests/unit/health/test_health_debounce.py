"""Flap damping with an injected clock: down at once, up only after the link stayed up."""

from __future__ import annotations

from agent.core.health import Debounce, fold
from agent.model import DeviceStatus, Health, ResourceView

R = "nvidia.com/cx7_qsfp"
A, B = "0002:01:00.2", "0002:01:00.3"


def view(**health: str) -> ResourceView:
    devs = []
    for key, h in sorted(health.items()):
        dev_id = A if key == "a" else B
        reason = "" if h == "Healthy" else "PF enP2p1s0f0np0 has no carrier"
        devs.append(DeviceStatus(dev_id, Health(h), 0, "0002:01:00.0", reason))
    return ResourceView(R, tuple(devs))


def reported(v: ResourceView) -> dict[str, str]:
    return {d.id: d.health.value for d in v.devices}


def test_first_sight_is_reported_as_observed() -> None:
    state, out, flipped = fold(Debounce(settle_s=2.0), view(a="Healthy", b="Unhealthy"), now=100.0)
    assert reported(out) == {A: "Healthy", B: "Unhealthy"}
    assert flipped == ()
    assert state.next_deadline() is None


def test_unhealthy_is_reported_immediately() -> None:
    state, _, _ = fold(Debounce(settle_s=2.0), view(a="Healthy"), now=0.0)
    state, out, flipped = fold(state, view(a="Unhealthy"), now=0.001)
    assert reported(out) == {A: "Unhealthy"}
    assert out.devices[0].reason == "PF enP2p1s0f0np0 has no carrier"
    assert flipped == (A,)


def test_recovery_is_held_until_settled_then_reported() -> None:
    state, _, _ = fold(Debounce(settle_s=2.0), view(a="Healthy"), now=0.0)
    state, _, _ = fold(state, view(a="Unhealthy"), now=1.0)
    state, out, flipped = fold(state, view(a="Healthy"), now=5.0)
    assert reported(out) == {A: "Unhealthy"}  # just came back: not yet
    assert out.devices[0].reason == "PF enP2p1s0f0np0 has no carrier"  # the reason it was down
    assert flipped == ()
    assert state.next_deadline() == 7.0
    state, out, flipped = fold(state, view(a="Healthy"), now=6.9)
    assert reported(out) == {A: "Unhealthy"} and flipped == ()
    state, out, flipped = fold(state, view(a="Healthy"), now=7.0)
    assert reported(out) == {A: "Healthy"}
    assert out.devices[0].reason == ""
    assert flipped == (A,)
    assert state.next_deadline() is None


def test_a_flap_during_settling_restarts_the_hold() -> None:
    state, _, _ = fold(Debounce(settle_s=2.0), view(a="Unhealthy"), now=0.0)
    state, _, _ = fold(state, view(a="Healthy"), now=1.0)
    state, _, _ = fold(state, view(a="Unhealthy"), now=2.0)
    state, out, _ = fold(state, view(a="Healthy"), now=2.5)
    assert state.next_deadline() == 4.5
    state, out, flipped = fold(state, view(a="Healthy"), now=3.5)  # 2.5 s after the first recovery
    assert reported(out) == {A: "Unhealthy"} and flipped == ()
    state, out, flipped = fold(state, view(a="Healthy"), now=4.5)
    assert reported(out) == {A: "Healthy"} and flipped == (A,)


def test_devices_are_independent_and_vanished_ones_are_forgotten() -> None:
    state, _, _ = fold(Debounce(settle_s=1.0), view(a="Healthy", b="Healthy"), now=0.0)
    state, out, flipped = fold(state, view(a="Unhealthy", b="Healthy"), now=1.0)
    assert reported(out) == {A: "Unhealthy", B: "Healthy"} and flipped == (A,)
    state, out, _ = fold(state, view(b="Healthy"), now=2.0)
    assert reported(out) == {B: "Healthy"}
    assert set(state.tracks) == {B}
    state, out, flipped = fold(state, view(a="Healthy", b="Healthy"), now=3.0)
    assert reported(out) == {A: "Healthy", B: "Healthy"} and flipped == ()  # back, no history


def test_zero_settle_reports_recovery_at_once() -> None:
    state, _, _ = fold(Debounce(settle_s=0.0), view(a="Unhealthy"), now=0.0)
    state, out, flipped = fold(state, view(a="Healthy"), now=0.0)
    assert reported(out) == {A: "Healthy"} and flipped == (A,)


def test_a_vanished_device_held_by_a_pod_stays_listed_unhealthy() -> None:
    state, _, _ = fold(Debounce(settle_s=1.0), view(a="Healthy", b="Healthy"), now=0.0)
    state, out, flipped = fold(state, view(b="Healthy"), now=1.0, held={A})
    assert reported(out) == {A: "Unhealthy", B: "Healthy"} and flipped == (A,)
    ghost = out.by_id()[A]
    assert ghost.reason == "VF PCI device is gone" and ghost.pf_pci_address == "0002:01:00.0"
    state, out, flipped = fold(state, view(b="Healthy"), now=2.0, held={A})
    assert reported(out) == {A: "Unhealthy", B: "Healthy"} and flipped == ()
    state, out, _ = fold(state, view(b="Healthy"), now=3.0, held=set())  # the pod released it
    assert reported(out) == {B: "Healthy"}


def test_a_vanished_device_that_returns_recovers_after_the_hold() -> None:
    state, _, _ = fold(Debounce(settle_s=1.0), view(a="Healthy"), now=0.0)
    state, _, _ = fold(state, view(), now=1.0, held={A})
    state, out, _ = fold(state, view(a="Healthy"), now=1.5, held={A})
    assert reported(out) == {A: "Unhealthy"}
    state, out, flipped = fold(state, view(a="Healthy"), now=2.5, held={A})
    assert reported(out) == {A: "Healthy"} and flipped == (A,)
