"""The raw RDMA netlink codec and the mount table reader that doctor's snapshot relies on."""

from __future__ import annotations

import errno
import socket
import struct
from pathlib import Path

import pytest

from agent.adapters import rdma_netlink as rn
from agent.adapters.hostinfo import is_real_sysfs, mount_of, parse_mountinfo


def _reply(seq: int, mode: int) -> bytes:
    """What nldev_sys_get_doit sends: netns mode, privileged qkey, copy-on-fork (u8 each), then the ACK."""
    attrs = b"".join(struct.pack("=HHB3x", 5, t, v) for t, v in ((66, mode), (88, 0), (86, 1)))
    msg = struct.pack("=IHHII", 16 + len(attrs), rn.SYS_GET_TYPE, 0, seq, 0) + attrs
    ack = struct.pack("=IHHII", 36, rn.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", 0)
    ack += rn.sys_get_request(seq)
    return msg + ack


def test_sys_get_request_is_a_bare_nldev_header() -> None:
    length, mtype, flags, seq, _ = struct.unpack("=IHHII", rn.sys_get_request(7))
    assert (length, mtype, flags, seq) == (16, (5 << 10) | 6, rn.NLM_F_REQUEST | rn.NLM_F_ACK, 7)


@pytest.mark.parametrize(("mode", "name"), [(1, "shared"), (0, "exclusive")])
def test_sys_get_reply_decodes_the_netns_mode(mode: int, name: str) -> None:
    msgs = list(rn.messages(_reply(3, mode)))
    assert [(t, s) for t, s, _ in msgs] == [(rn.SYS_GET_TYPE, 3), (rn.NLMSG_ERROR, 3)]
    attrs = rn.attributes(msgs[0][2])
    assert attrs[rn.RDMA_NLDEV_SYS_ATTR_NETNS_MODE] == bytes([mode])
    assert ("shared" if attrs[66][0] else "exclusive") == name


def test_no_ib_core_is_named() -> None:
    err = rn.RdmaNetlinkError("socket", errno.EPROTONOSUPPORT)
    assert str(err).endswith("(ib_core is not loaded)")


def test_netns_mode_on_this_kernel_answers_or_says_why() -> None:
    """Either ib_core is loaded (a mode) or the socket is refused with EPROTONOSUPPORT: never a hang."""
    try:
        probe = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, rn.NETLINK_RDMA)
    except OSError:
        with pytest.raises(rn.RdmaNetlinkError) as exc:
            rn.netns_mode()
        assert exc.value.code == errno.EPROTONOSUPPORT
        return
    probe.close()
    assert rn.netns_mode() in ("shared", "exclusive")


MOUNTINFO = """\
22 1 0:21 / / rw,relatime - overlay overlay rw
23 22 0:22 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
24 22 0:23 / /host/sys rw,nosuid - sysfs sysfs rw
25 22 8:1 /etc /host/etc ro,relatime - xfs /dev/sda1 rw
26 22 0:40 / /tmp/with\\040space rw - tmpfs tmpfs rw
"""


def test_mount_of_picks_the_longest_prefix() -> None:
    assert [m.mount_point for m in parse_mountinfo(MOUNTINFO)][-1] == "/tmp/with space"
    sysfs = mount_of("/host/sys", MOUNTINFO)
    assert sysfs is not None and (sysfs.fstype, sysfs.read_only) == ("sysfs", False)
    etc = mount_of("/host/etc", MOUNTINFO)
    assert etc is not None and etc.read_only
    other = mount_of("/host/var", MOUNTINFO)
    assert other is not None and other.mount_point == "/"


def test_real_sysfs_is_told_from_a_drawn_tree(tmp_path: Path) -> None:
    (tmp_path / "sys").mkdir()
    assert is_real_sysfs("/")
    assert not is_real_sysfs(str(tmp_path))
    assert is_real_sysfs("/host", MOUNTINFO)  # the DaemonSet's --sysfs-root
