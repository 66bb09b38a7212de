"""The RDMA subsystem's settings over RDMA netlink (NETLINK_RDMA), as `rdma system show` asks them.

pyroute2 has no RDMA family, and the one question we ask (RDMA_NLDEV_CMD_SYS_GET) is a 16-byte
request, so this is a raw socket. Constants from include/uapi/rdma/rdma_netlink.h.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

from agent.errors import AgentError

NETLINK_RDMA = 20
RDMA_NL_NLDEV = 5
RDMA_NLDEV_CMD_SYS_GET = 6
RDMA_NLDEV_SYS_ATTR_NETNS_MODE = 66  # u8: 1 shared, 0 exclusive (ib_core's ib_devices_shared_netns)
SYS_GET_TYPE = (RDMA_NL_NLDEV << 10) | RDMA_NLDEV_CMD_SYS_GET  # RDMA_NL_GET_TYPE(client, op)

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
NLMSG_DONE = 3
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLATTR = struct.Struct("=HH")  # len, type
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER


class RdmaNetlinkError(AgentError):
    """RDMA netlink could not answer; EPROTONOSUPPORT on the socket means ib_core is not loaded."""

    def __init__(self, op: str, code: int) -> None:
        self.op = op
        self.code = code
        name = errno.errorcode.get(code, str(code))
        hint = " (ib_core is not loaded)" if code == errno.EPROTONOSUPPORT else ""
        super().__init__(f"RDMA netlink {op}: {name} ({os.strerror(code)}){hint}")


def sys_get_request(seq: int) -> bytes:
    """An RDMA_NLDEV_CMD_SYS_GET request: a bare nlmsghdr (nldev messages have no family header)."""
    return _NLMSGHDR.pack(_NLMSGHDR.size, SYS_GET_TYPE, NLM_F_REQUEST | NLM_F_ACK, seq, 0)


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, seq, payload) of each netlink message in one datagram."""
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _, seq, _ = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        yield mtype, seq, data[off + _NLMSGHDR.size: off + length]
        off += (length + 3) & ~3


def attributes(payload: bytes) -> dict[int, bytes]:
    """Top-level netlink attributes by type."""
    out: dict[int, bytes] = {}
    off = 0
    while off + _NLATTR.size <= len(payload):
        length, atype = _NLATTR.unpack_from(payload, off)
        if length < _NLATTR.size or off + length > len(payload):
            break
        out[atype & NLA_TYPE_MASK] = payload[off + _NLATTR.size: off + length]
        off += (length + 3) & ~3
    return out


def sys_attributes(timeout: float = 2.0) -> dict[int, bytes]:
    """Ask the kernel for the RDMA system attributes (netns mode, copy-on-fork, privileged qkey)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_RDMA)
    except OSError as e:
        raise RdmaNetlinkError("socket", e.errno or errno.EIO) from e
    with sock:
        sock.settimeout(timeout)
        seq = 1
        attrs: dict[int, bytes] | None = None
        try:
            sock.bind((0, 0))
            sock.send(sys_get_request(seq))
            while True:
                for mtype, mseq, payload in messages(sock.recv(65536)):
                    if mseq != seq:
                        continue
                    if mtype == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", payload)[0]
                        if code:
                            raise RdmaNetlinkError("sys get", code)
                        return attrs or {}
                    if mtype == NLMSG_DONE:
                        return attrs or {}
                    if mtype == SYS_GET_TYPE:
                        attrs = attributes(payload)
        except TimeoutError as e:
            raise RdmaNetlinkError("sys get", errno.ETIMEDOUT) from e
        except OSError as e:
            raise RdmaNetlinkError("sys get", e.errno or errno.EIO) from e


def netns_mode() -> str:
    """"shared" or "exclusive", as `rdma system show netns` prints it."""
    raw = sys_attributes().get(RDMA_NLDEV_SYS_ATTR_NETNS_MODE)
    if not raw:
        raise RdmaNetlinkError("sys get (no netns mode attribute)", errno.ENODATA)
    return "shared" if raw[0] else "exclusive"
