"""The pure planner: kernel rules, refusals and idempotency, from plain observed state."""

from __future__ import annotations

from dataclasses import replace

from agent.config import PfConfig, parse_config
from agent.core.reconcile import (
    BindVfDriver,
    Desired,
    Observed,
    PfDesired,
    Refuse,
    SetDriversAutoprobe,
    SetLinkUp,
    SetMtu,
    SetNumVfs,
    SetVfAttrs,
    VfChange,
    WaitForVfs,
    Warn,
    mutates,
    plan,
    stable_mac,
)
from agent.model import NetdevInfo, PfInfo, VfAttrs, VfInfo

PF = "0002:01:00.0"
IF = "enP2p1s0f0np0"


def pf_config(extra: str = "numVfs: 4") -> PfConfig:
    body = ", ".join(["pciAddress: \"0002:01:00.0\"", *[p.strip() for p in extra.split(",")]])
    return parse_config(f"resources: [{{resourceName: a.com/b, pfs: [{{{body}}}]}}]").resources[0].pfs[0]


def fresh_attrs(i: int) -> VfAttrs:
    return VfAttrs(i, "00:00:00:00:00:00", False, False, "auto", 0, 0, 0, 0)


def netdev(name: str) -> NetdevInfo:
    return NetdevInfo(name, "up", True, 1500, 0)


def observed(numvfs: int = 0, total: int | None = 8, driver: str | None = "mlx5_core",
             vf_driver: str | None = "mlx5_core", **kw: object) -> PfInfo:
    """One PF as a reconcile's read shows it: sysfs, with rtnetlink's admin state, MTU and VF attributes."""
    vfs = tuple(VfInfo(f"0002:01:00.{i + 2}", i, PF, driver=vf_driver,
                       netdev=netdev(f"enP2p1s0f0v{i}") if vf_driver else None, attrs=fresh_attrs(i))
                for i in range(numvfs))
    base = PfInfo(PF, "15b3", "1021", driver, netdev(IF), -1, total, numvfs, vfs,
                  sriov_drivers_autoprobe=True, eswitch_mode="legacy", admin_up=True)
    return replace(base, **kw)  # type: ignore[arg-type]


def run(cfg: PfConfig, have: PfInfo, in_use: frozenset[str] = frozenset(), node: str = "n1") -> tuple:
    return plan(Desired((PfDesired(PF, "a.com/b", cfg, node_name=node),)), Observed({PF: have}, in_use))


def test_create_from_zero_then_nothing_when_in_desired_state() -> None:
    assert run(pf_config(), observed(0)) == (SetNumVfs(PF, 4), WaitForVfs(PF, 4, probed=True))
    assert run(pf_config(), observed(4)) == ()


def test_nonzero_to_nonzero_goes_through_zero() -> None:
    assert run(pf_config("numVfs: 8"), observed(4)) == (
        SetNumVfs(PF, 0), SetNumVfs(PF, 8), WaitForVfs(PF, 8, probed=True))
    assert run(pf_config("numVfs: 0"), observed(4)) == (SetNumVfs(PF, 0),)


def test_above_totalvfs_is_refused_with_the_firmware_hint() -> None:
    (refusal,) = run(pf_config("numVfs: 16"), observed(4, total=8))
    assert isinstance(refusal, Refuse) and refusal.reason == "over_totalvfs"
    assert "sriov_totalvfs 8" in refusal.message and "NUM_OF_VFS=16" in refusal.message
    assert "mstconfig" in refusal.message and "reboot" in refusal.message


def test_no_sriov_capability_and_no_pf_driver_are_refused_before_writing() -> None:
    (a,) = run(pf_config(), observed(0, total=None))
    assert isinstance(a, Refuse) and a.reason == "no_sriov" and "SRIOV_EN=1" in a.message
    (b,) = run(pf_config(), observed(0, driver=None))
    assert isinstance(b, Refuse) and b.reason == "no_pf_driver"


def test_never_destroys_vfs_held_by_pods() -> None:
    held = frozenset({"0002:01:00.3"})
    for target in ("numVfs: 0", "numVfs: 2", "numVfs: 8"):
        (refusal,) = run(pf_config(target), observed(4), in_use=held)
        assert isinstance(refusal, Refuse) and refusal.reason == "vf_in_use"
        assert "0002:01:00.3" in refusal.message
    # A VF of another PF being in use does not block this one.
    assert SetNumVfs(PF, 0) in run(pf_config("numVfs: 8"), observed(4), in_use=frozenset({"0000:01:00.2"}))


def test_unknown_holders_keep_existing_vfs_and_their_settings() -> None:
    """After an agent restart our own Allocate record is empty: while PodResources does not answer,
    any VF may be in a running pod, so none is destroyed or reconfigured; creating VFs is still fine."""
    why = "PodResources at /p/kubelet.sock: UNAVAILABLE: connection refused"
    for target in ("numVfs: 0", "numVfs: 2", "numVfs: 8"):
        (refusal,) = plan(Desired((PfDesired(PF, "a.com/b", pf_config(target), node_name="n1"),)),
                          Observed({PF: observed(4)}, frozenset(), why))
        assert isinstance(refusal, Refuse) and refusal.reason == "holders_unknown"
        assert "4 -> " in refusal.message and "connection refused" in refusal.message
    fresh = plan(Desired((PfDesired(PF, "a.com/b", pf_config("numVfs: 4"), node_name="n1"),)),
                 Observed({PF: observed(0)}, frozenset(), why))
    assert fresh == (SetNumVfs(PF, 4), WaitForVfs(PF, 4, probed=True))
    (warn,) = plan(Desired((PfDesired(PF, "a.com/b", pf_config("numVfs: 2, trust: true"), node_name="n1"),)),
                   Observed({PF: observed(2)}, frozenset(), why))
    assert isinstance(warn, Warn) and warn.reason == "holders_unknown"
    assert "0002:01:00.2, 0002:01:00.3" in warn.message


def test_settings_of_held_vfs_are_deferred_others_applied() -> None:
    actions = run(pf_config("numVfs: 2, trust: true"), observed(2), in_use=frozenset({"0002:01:00.2"}))
    assert actions == (SetVfAttrs(PF, IF, 1, VfChange(trust=True)),
                       Warn(PF, "vf_in_use", "settings of VFs held by pods are left alone until released: "
                                             "0002:01:00.2"))


def test_externally_managed_is_never_written() -> None:
    cfg = pf_config("numVfs: 8, externallyManaged: true, trust: true, mtu: 9000")
    actions = run(cfg, observed(4, admin_up=False))
    assert not any(mutates(a) for a in actions)
    assert {a.reason for a in actions if isinstance(a, Warn)} == {"externally_managed_mismatch"}
    assert run(pf_config("externallyManaged: true"), observed(4)) == ()


def test_vf_attributes_only_where_they_differ() -> None:
    cfg = pf_config("numVfs: 2, trust: true, spoofchk: false, linkState: enable, vlan: 100, qos: 3, "
                    "maxTxRate: 10000")
    have = observed(2)
    set_already = VfAttrs(1, "00:00:00:00:00:00", True, False, "enable", 100, 3, 0, 10000)
    done = replace(have.vfs[1], attrs=set_already)
    have = replace(have, vfs=(have.vfs[0], done))
    assert run(cfg, have) == (SetVfAttrs(PF, IF, 0, VfChange(trust=True, link_state="enable", vlan=100, qos=3,
                                                               min_tx_rate=0, max_tx_rate=10000)),)


def test_stable_mac_is_deterministic_locally_administered_and_distinct() -> None:
    macs = {stable_mac("n1", PF, i) for i in range(64)} | {stable_mac("n2", PF, 0)}
    assert len(macs) == 65
    first = int(stable_mac("n1", PF, 0).split(":")[0], 16)
    assert first & 0x02 and not first & 0x01  # locally administered, unicast
    actions = run(pf_config("numVfs: 1, mac: stable"), observed(1))
    assert actions == (SetVfAttrs(PF, IF, 0, VfChange(mac=stable_mac("n1", PF, 0))),)
    applied = replace(observed(1).vfs[0], attrs=replace(fresh_attrs(0), mac=stable_mac("n1", PF, 0)))
    assert run(pf_config("numVfs: 1, mac: stable"), replace(observed(1), vfs=(applied,))) == ()


def test_vf_driver_binding_then_vf_mtu() -> None:
    actions = run(pf_config("numVfs: 1, vfDriver: vfio-pci, vfMtu: 9000"), observed(1))
    assert actions == (BindVfDriver(PF, 0, "0002:01:00.2", "vfio-pci", "mlx5_core"),)
    actions = run(pf_config("numVfs: 1, vfMtu: 9000"), observed(1))
    assert actions == (SetMtu(PF, "enP2p1s0f0v0", 9000, vf=0),)


def test_pf_mtu_admin_up_and_autoprobe_come_before_the_vf_count() -> None:
    actions = run(pf_config("numVfs: 2, mtu: 9000, driversAutoprobe: false"),
                  observed(0, admin_up=False))
    assert actions == (SetMtu(PF, IF, 9000), SetLinkUp(PF, IF), SetDriversAutoprobe(PF, False),
                       SetNumVfs(PF, 2), WaitForVfs(PF, 2, probed=False))


def test_switchdev_eswitch_is_reported_for_rdma_resources() -> None:
    actions = run(pf_config(), observed(4, eswitch_mode="switchdev"))
    assert [(type(a), a.reason) for a in actions if isinstance(a, Warn)] == [(Warn, "eswitch_switchdev")]


def test_unknown_vf_attributes_are_set_rather_than_assumed() -> None:
    have = observed(1)
    have = replace(have, vfs=(replace(have.vfs[0], attrs=None),))
    assert run(pf_config("numVfs: 1, trust: false"), have) == (SetVfAttrs(PF, IF, 0, VfChange(trust=False)),)
