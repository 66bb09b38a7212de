"""The VF netlink messages: what we ask pyroute2 to send decodes, on the wire, to what we meant."""

from __future__ import annotations

from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.requests.link import LinkIPRouteFilter

from agent.adapters.netlink_vf import parse_link, vf_request
from agent.core.reconcile import VfChange
from agent.model import VfAttrs


def wire(index: int, flags: int, mtu: int, *changes: tuple[int, VfChange]) -> ifinfmsg:
    """Build the IFLA_VFINFO_LIST pyroute2 sends for ``changes``, encode, and decode it again."""
    attrs: list[tuple[str, object]] = [("IFLA_IFNAME", "pf0"), ("IFLA_MTU", mtu)]
    if changes:
        nla = LinkIPRouteFilter("set").get_vf([vf_request(i, c) for i, c in changes])
        attrs.append(("IFLA_VFINFO_LIST", nla))
    msg = ifinfmsg()
    msg["index"], msg["flags"], msg["attrs"] = index, flags, attrs
    msg.encode()
    out = ifinfmsg(msg.data)
    out.decode()
    return out


def test_every_vf_attribute_survives_the_wire() -> None:
    full = VfChange(mac="02:11:22:33:44:55", trust=True, spoofchk=False, link_state="disable",
                    vlan=100, qos=2, min_tx_rate=100, max_tx_rate=5000)
    link = parse_link(wire(7, 1, 9000, (3, full), (0, VfChange(trust=False))))
    assert (link.ifname, link.ifindex, link.mtu, link.admin_up) == ("pf0", 7, 9000, True)
    assert link.vfs == (
        VfAttrs(0, "00:00:00:00:00:00", trust=False),
        VfAttrs(3, "02:11:22:33:44:55", True, False, "disable", 100, 2, 100, 5000),
    )


def test_only_changed_attributes_are_sent() -> None:
    assert vf_request(1, VfChange(spoofchk=True)) == {"vf": 1, "spoofchk": 1}
    assert vf_request(2, VfChange(link_state="auto")) == {"vf": 2, "link_state": 0}
    assert vf_request(0, VfChange(max_tx_rate=1000, min_tx_rate=0)) == {
        "vf": 0, "rate": {"min_tx_rate": 0, "max_tx_rate": 1000}}


def test_a_link_without_vfs_and_admin_down() -> None:
    link = parse_link(wire(2, 0, 1500))
    assert (link.admin_up, link.vfs) == (False, ())
