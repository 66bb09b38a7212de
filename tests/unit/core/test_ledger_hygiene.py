"""The pod ledger's rule and VF hygiene's baseline and fence, as pure functions; the fence file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.adapters.fencestore import FILE_NAME, FenceStore
from agent.config import parse_config
from agent.core.hygiene import RESETTING, baseline_actions, baseline_change, fenced, retry_delay
from agent.core.ledger import judge
from agent.core.reconcile import SetMtu, SetVfAttrs, VfChange, stable_mac
from agent.errors import ConfigError
from agent.model import DeviceStatus, Health, ResourceView

PF = "0002:01:00.0"
A, B, C = "0002:01:00.2", "0002:01:00.3", "0002:01:00.4"


def pf_config(fields: str = "") -> object:
    extra = f", {fields}" if fields else ""
    return parse_config(f"resources: [{{resourceName: a.com/b, pfs: [{{pfName: p0, numVfs: 4{extra}}}]}}]"
                        ).resources[0].pfs[0]


def test_ledger_trusts_pod_resources_and_a_recent_unconfirmed_allocate() -> None:
    now = 1000.0
    records = {A: (now - 1, False), B: (now - 120, False), C: (now - 1, True)}
    j = judge({C}, records, now)
    assert j.held == {A, C}  # A: allocated a second ago, the kubelet has not listed it yet
    assert j.keep == {A, C}  # B: stale (pod never started or long gone): pruned
    # C was listed once (confirmed): when the kubelet stops listing it, it is released at once.
    assert judge(set(), records, now).held == {A}


def test_ledger_without_pod_resources_counts_every_record() -> None:
    records = {A: (0.0, True), B: (0.0, False)}
    j = judge(None, records, 10_000.0)
    assert j.held == {A, B} and j.keep == {A, B}


def test_baseline_is_the_config_or_the_neutral_value() -> None:
    bare = baseline_change(PF, pf_config(), 1, "n1")  # type: ignore[arg-type]
    assert bare == VfChange(mac=None, trust=False, spoofchk=None, link_state="auto", vlan=0, qos=0,
                            min_tx_rate=0, max_tx_rate=0)
    cfg = pf_config("mac: stable, trust: true, spoofchk: false, linkState: enable, vlan: 7, qos: 2, "
                    "maxTxRate: 900, vfMtu: 9000")
    assert baseline_change(PF, cfg, 1, "n1") == VfChange(  # type: ignore[arg-type]
        mac=stable_mac("n1", PF, 1), trust=True, spoofchk=False, link_state="enable", vlan=7, qos=2,
        min_tx_rate=0, max_tx_rate=900)
    actions = baseline_actions(PF, "p0", cfg, 1, vf_netdev="p0v1", node_name="n1")  # type: ignore[arg-type]
    assert [type(a) for a in actions] == [SetVfAttrs, SetMtu] and actions[1] == SetMtu(PF, "p0v1", 9000, vf=1)
    # A VF netdev still away gets no MTU; a PF without netdev (vfio, NVMe) gets no netlink at all.
    assert len(baseline_actions(PF, "p0", cfg, 1, vf_netdev=None, node_name="n1")) == 1  # type: ignore[arg-type]
    assert baseline_actions(PF, None, pf_config(), 1, vf_netdev=None, node_name="n1") == ()  # type: ignore[arg-type]


def test_fence_overrides_health_with_its_reason() -> None:
    view = ResourceView("a.com/b", (DeviceStatus(A, Health.HEALTHY, 0, PF),
                                    DeviceStatus(B, Health.HEALTHY, 0, PF)))
    out = fenced(view, {B: RESETTING})
    assert out.by_id()[A] == view.by_id()[A]
    assert (out.by_id()[B].health, out.by_id()[B].reason) == (Health.UNHEALTHY, "resetting")
    assert fenced(view, {}) is view


def test_retry_backoff_doubles_to_a_cap() -> None:
    assert [retry_delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert retry_delay(20) == 60.0


@pytest.mark.parametrize("value", ["reboot", 1, True])
def test_reset_on_release_is_validated(value: object) -> None:
    with pytest.raises(ConfigError) as err:
        pf_config(f"resetOnRelease: {json.dumps(value)}")
    assert "resetOnRelease" in str(err.value) and "none, settings, flr" in str(err.value)


def test_reset_on_release_defaults_to_settings() -> None:
    assert pf_config().reset_on_release == "settings"  # type: ignore[attr-defined]
    assert pf_config("resetOnRelease: flr").reset_on_release == "flr"  # type: ignore[attr-defined]


def test_fence_file_round_trip_and_a_corrupt_file(tmp_path: Path) -> None:
    store = FenceStore(str(tmp_path / "state"))
    assert store.load() == {}
    store.save({B: PF})
    assert FenceStore(str(tmp_path / "state")).load() == {B: PF}
    store.save({})
    assert FenceStore(str(tmp_path / "state")).load() == {}
    (tmp_path / "state" / FILE_NAME).write_text("{not json")
    assert FenceStore(str(tmp_path / "state")).load() == {}  # logged; the agent goes on
