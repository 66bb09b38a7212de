"""The watcher's lean link decoder agrees with pyroute2's full decoder on what the kernel sends."""

from __future__ import annotations

import socket
import struct

import pyroute2.netlink as nl
from pyroute2.netlink import (
    NETLINK_ROUTE,
    NLM_F_DUMP,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    rtnl,
)
from pyroute2.netlink.rtnl import RTM_GETLINK, RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from agent.adapters import netlink, udev
from agent.adapters.netlink import decode


def dump_datagrams() -> list[bytes]:
    """A real RTM_GETLINK dump of this process's network namespace, datagram by datagram."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as s:
        s.bind((0, 0))
        req = ifinfmsg()
        req["header"]["type"] = RTM_GETLINK
        req["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
        req["header"]["sequence_number"] = 7
        req.encode()
        s.send(req.data)
        out = []
        while True:
            data = s.recv(1 << 16)
            out.append(data)
            if any(m.type == NLMSG_DONE for m in decode(data)):
                return out


def test_every_link_of_a_real_dump_matches_pyroute2() -> None:
    full = MarshalRtnl()
    compared = 0
    for data in dump_datagrams():
        lean = [m for m in decode(data) if m.type == RTM_NEWLINK]
        ref = [m for m in full.parse(data) if m["header"]["type"] == RTM_NEWLINK]
        assert len(lean) == len(ref)
        for mine, theirs in zip(lean, ref, strict=True):
            assert mine.link is not None
            assert mine.seq == 7 and mine.flags & NLM_F_MULTI
            assert mine.link.name == theirs.get_attr("IFLA_IFNAME")
            assert mine.link.ifindex == theirs["index"]
            assert mine.link.admin_up == bool(theirs["flags"] & IFF_UP)
            assert mine.link.carrier == bool(theirs.get_attr("IFLA_CARRIER"))
            assert mine.link.operstate == str(theirs.get_attr("IFLA_OPERSTATE")).lower()
            assert mine.link.parent_bus == (theirs.get_attr("IFLA_PARENT_DEV_BUS_NAME") or "")
            compared += 1
    assert compared >= 1  # at least lo


def test_error_and_done_messages() -> None:
    err = struct.pack("=IHHII", 36, NLMSG_ERROR, 0, 9, 0) + struct.pack("=i", -105) + b"\0" * 16
    done = struct.pack("=IHHII", 20, NLMSG_DONE, NLM_F_MULTI, 9, 0) + b"\0" * 4
    msgs = decode(err + done)
    assert [(m.type, m.seq, m.error) for m in msgs] == [(NLMSG_ERROR, 9, 105), (NLMSG_DONE, 9, 0)]


def test_truncated_datagram_stops_cleanly() -> None:
    data = dump_datagrams()[0]
    assert decode(data[:10]) == []
    first_len = struct.unpack_from("=I", data)[0]
    assert len(decode(data[: first_len + 8])) == 1


def test_kernel_constants_and_dump_request_match_pyroute2() -> None:
    """The watcher writes the UAPI numbers out (no pyroute2 import when serving): same as pyroute2's."""
    for name in ("NETLINK_ROUTE", "NLM_F_REQUEST", "NLM_F_DUMP", "NLM_F_DUMP_INTR", "NLMSG_ERROR",
                 "NLMSG_DONE"):
        assert getattr(netlink, name) == getattr(nl, name), name
    for name in ("RTM_NEWLINK", "RTM_DELLINK", "RTM_GETLINK", "RTMGRP_LINK"):
        assert getattr(netlink, name) == getattr(rtnl, name), name
    assert netlink.IFF_UP == IFF_UP
    ifla = {entry[0]: i for i, entry in enumerate(ifinfmsg.nla_map)}
    for name in ("IFLA_IFNAME", "IFLA_OPERSTATE", "IFLA_CARRIER", "IFLA_PARENT_DEV_BUS_NAME"):
        assert getattr(netlink, name) == ifla[name], name
    assert udev.NETLINK_KOBJECT_UEVENT == nl.NETLINK_KOBJECT_UEVENT
    req = ifinfmsg()
    req["header"]["type"] = RTM_GETLINK
    req["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    req["header"]["sequence_number"] = 42
    req["family"] = socket.AF_UNSPEC
    req.encode()
    assert netlink.dump_request(42) == req.data
