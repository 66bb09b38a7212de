"""PF-side VF settings, MTU and admin state over rtnetlink (pyroute2), eswitch mode over devlink.

Blocking calls: the executor runs them in worker threads. A link dump carries VF info
(IFLA_NUM_VF, IFLA_VFINFO_LIST) only when the request sets IFLA_EXT_MASK = RTEXT_FILTER_VF, so
every read passes ``ext_mask=1``. Kernel errors become NetlinkOpError with the errno.

pyroute2 is imported on first use, not with this module: its package import loads all of it
(~11 MiB resident, ~0.1 s), which an agent that never asks the kernel here should not pay.
"""

from __future__ import annotations

import errno
from typing import Any

from agent.core.reconcile import VfChange
from agent.errors import NetlinkOpError
from agent.model import LINK_STATES, PfLink, VfAttrs

RTEXT_FILTER_VF = 1
NLM_F_REQUEST = 1
# enum devlink_eswitch_mode (uapi/linux/devlink.h)
ESWITCH_MODES = {0: "legacy", 1: "switchdev"}
# pyroute2 decodes an unset rate/vlan as 0; the kernel reports "no admin MAC" as all zeroes.
ZERO_MAC = "00:00:00:00:00:00"


def vf_request(index: int, change: VfChange) -> dict[str, Any]:
    """The ``vf=`` argument of IPRoute.link("set") for one VF: only the attributes being changed."""
    spec: dict[str, Any] = {"vf": index}
    if change.mac is not None:
        spec["mac"] = change.mac
    if change.trust is not None:
        spec["trust"] = int(change.trust)
    if change.spoofchk is not None:
        spec["spoofchk"] = int(change.spoofchk)
    if change.link_state is not None:
        spec["link_state"] = LINK_STATES.index(change.link_state)
    if change.vlan is not None:
        spec["vlan"] = {"vlan": change.vlan, "qos": change.qos or 0}
    if change.min_tx_rate is not None or change.max_tx_rate is not None:
        spec["rate"] = {"min_tx_rate": change.min_tx_rate or 0, "max_tx_rate": change.max_tx_rate or 0}
    return spec


def parse_link(msg: Any) -> PfLink:
    """An RTM_NEWLINK message (requested with RTEXT_FILTER_VF) -> PfLink with every VF's attributes."""
    vfs = []
    vflist = msg.get_attr("IFLA_VFINFO_LIST")
    for info in vflist.get_attrs("IFLA_VF_INFO") if vflist is not None else ():
        vfs.append(_parse_vf(info))
    return PfLink(
        ifname=msg.get_attr("IFLA_IFNAME") or "",
        ifindex=int(msg["index"]),
        mtu=int(msg.get_attr("IFLA_MTU") or 0),
        admin_up=bool(msg["flags"] & 1),  # IFF_UP
        vfs=tuple(sorted(vfs, key=lambda v: v.index)),
    )


def _parse_vf(info: Any) -> VfAttrs:
    def field(nla: str, key: str) -> Any:
        attr = info.get_attr(nla)
        return None if attr is None else attr.get(key)

    mac = field("IFLA_VF_MAC", "mac")
    link_state = field("IFLA_VF_LINK_STATE", "link_state")
    trust = field("IFLA_VF_TRUST", "trust")
    spoof = field("IFLA_VF_SPOOFCHK", "spoofchk")
    # Every IFLA_VF_* payload starts with the VF number; take it from whichever came first.
    index = next((a["vf"] for _, a in info["attrs"] if isinstance(a, dict) and "vf" in a), 0)
    return VfAttrs(
        index=int(index),
        mac=(mac or ZERO_MAC).lower(),
        trust=None if trust is None else bool(trust),
        spoofchk=None if spoof is None or spoof == 0xFFFFFFFF else bool(spoof),  # -1: not supported
        link_state=LINK_STATES[link_state] if isinstance(link_state, int) and link_state < 3 else None,
        vlan=int(field("IFLA_VF_VLAN", "vlan") or 0),
        qos=int(field("IFLA_VF_VLAN", "qos") or 0),
        min_tx_rate=field("IFLA_VF_RATE", "min_tx_rate"),
        max_tx_rate=field("IFLA_VF_RATE", "max_tx_rate"),
    )


class PyrouteVfNetlink:
    """The netlink port of the executor on a real node (host network namespace unless ``netns``)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def _ipr(self) -> Any:
        from pyroute2 import IPRoute  # noqa: PLC0415 (lazy: see the module docstring)

        return IPRoute(netns=self.netns) if self.netns else IPRoute()

    def _ifindex(self, ipr: Any, ifname: str) -> int:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise NetlinkOpError("lookup", ifname, errno.ENODEV)
        return int(found[0])

    def read_pf(self, ifname: str) -> PfLink:
        from pyroute2 import NetlinkError  # noqa: PLC0415 (lazy: see the module docstring)

        with self._ipr() as ipr:
            try:
                (msg,) = ipr.link("get", index=self._ifindex(ipr, ifname), ext_mask=RTEXT_FILTER_VF)
            except NetlinkError as e:
                raise NetlinkOpError("getlink", ifname, e.code) from e
        return parse_link(msg)

    def set_vf(self, ifname: str, vf: int, change: VfChange) -> None:
        self._set(ifname, "setlink vf", vf=vf_request(vf, change))

    def set_mtu(self, ifname: str, mtu: int) -> None:
        self._set(ifname, "setlink mtu", mtu=mtu)

    def set_up(self, ifname: str) -> None:
        self._set(ifname, "setlink up", state="up")

    def _set(self, ifname: str, op: str, **kwargs: Any) -> None:
        from pyroute2 import NetlinkError  # noqa: PLC0415 (lazy: see the module docstring)

        with self._ipr() as ipr:
            try:
                ipr.link("set", index=self._ifindex(ipr, ifname), **kwargs)
            except NetlinkError as e:
                raise NetlinkOpError(op, ifname, e.code) from e

    def eswitch_mode(self, pci_address: str) -> str | None:
        """devlink eswitch mode of pci/<addr>; None when the kernel has no devlink or the device none."""
        from pyroute2 import DL, NetlinkError  # noqa: PLC0415 (lazy: see the module docstring)
        from pyroute2.netlink.devlink import DEVLINK_NAMES, devlinkcmd  # noqa: PLC0415

        msg = devlinkcmd()
        msg["cmd"] = DEVLINK_NAMES["DEVLINK_CMD_ESWITCH_GET"]
        msg["version"] = 1
        msg["attrs"] = [("DEVLINK_ATTR_BUS_NAME", "pci"), ("DEVLINK_ATTR_DEV_NAME", pci_address)]
        try:
            with DL() as dl:
                replies = dl.nlm_request(msg, msg_type=dl.prid, msg_flags=NLM_F_REQUEST)
        except OSError as e:
            # No generic netlink socket at all: a sandbox or an emulator (qemu-user) refuses the family.
            if e.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
                return None
            raise NetlinkOpError("devlink eswitch get", pci_address, e.errno or errno.EIO) from e
        except NetlinkError as e:
            if e.code in (errno.ENOENT, errno.ENODEV, errno.EOPNOTSUPP, errno.EINVAL):
                return None  # no devlink family, no such devlink device, or no eswitch
            raise NetlinkOpError("devlink eswitch get", pci_address, e.code) from e
        for reply in replies:
            mode = reply.get_attr("DEVLINK_ATTR_ESWITCH_MODE")
            if mode is not None:
                return ESWITCH_MODES.get(int(mode), str(mode))
        return None
