"""RTNLGRP_LINK watcher: the kernel pushes every link change; we keep the latest word per netdev.

One NETLINK_ROUTE socket bound to the link multicast group, read from the asyncio loop with
add_reader (idle CPU is zero: nothing runs until the kernel queues a message). The request and
the few constants it needs are the kernel's fixed UAPI numbers, written out here: importing
pyroute2 loads its whole package (~11 MiB of resident memory, a third of start-up time) and every
serving agent runs this watcher. pyroute2 is imported only to create the socket in another network
namespace (tests, benches). Its generic decoder walks every attribute of a link message (about
1 ms each in CPython); the watcher needs five, so ``decode`` reads just those, which keeps the
kernel-to-kubelet path in single-digit milliseconds.

When the receive queue overflows the kernel drops messages and the next read fails with ENOBUFS;
what we hold may then be stale, so the socket is recreated and the link table rebuilt from a full
RTM_GETLINK dump. A slow periodic dump is only a safety net against anything else missed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from agent.core.health import LinkObservation
from agent.errors import NetlinkOpError
from agent.logs import ctx
from agent.stats import Stats

log = logging.getLogger(__name__)

# linux/netlink.h, linux/rtnetlink.h, linux/if.h, linux/if_link.h (tests check them against pyroute2).
NETLINK_ROUTE = 0
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_DUMP_INTR = 0x10
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTMGRP_LINK = 0x1
IFF_UP = 0x1
IFLA_IFNAME = 3
IFLA_OPERSTATE = 16
IFLA_CARRIER = 33
IFLA_PARENT_DEV_BUS_NAME = 57

DEFAULT_RCVBUF = 1 << 20  # holds a few thousand link messages: a VF storm fits
DEFAULT_RESYNC_S = 60.0
_RECV_SIZE = 1 << 16


class NetlinkSocket(Protocol):
    """The slice of socket.socket the watcher uses (a seam for injecting errors in tests)."""

    def fileno(self) -> int: ...
    def recv(self, bufsize: int) -> bytes: ...
    def send(self, data: bytes) -> int: ...
    def close(self) -> None: ...


Links = dict[int, LinkObservation]
OnChange = Callable[[Links, Links, str], Awaitable[None]]


def open_route_socket(netns: str | None, rcvbuf: int) -> socket.socket:
    """A non-blocking NETLINK_ROUTE socket subscribed to link events, in ``netns`` if given."""
    try:
        if netns is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        else:
            from pyroute2 import netns as pr_netns  # noqa: PLC0415 (lazy: see the module docstring)

            # flags=0: never create the namespace, only enter an existing one.
            sock = pr_netns.create_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE, flags=0)
    except OSError as e:
        raise NetlinkOpError("open", netns or "<host>", e.errno or errno.EIO) from e
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE: beyond rmem_max (root)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, RTMGRP_LINK))
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise NetlinkOpError("bind", netns or "<host>", e.errno or errno.EIO) from e
    return sock


_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
_NLATTR = struct.Struct("=HH")  # len, type
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
# RFC 2863 operational states as the kernel numbers them (IF_OPER_*), in sysfs spelling.
OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")


@dataclass(frozen=True)
class Message:
    """One netlink message as the watcher needs it."""

    type: int
    flags: int
    seq: int
    link: LinkObservation | None = None  # RTM_NEWLINK / RTM_DELLINK
    error: int = 0  # NLMSG_ERROR: the (positive) errno, 0 for an ACK


def dump_request(seq: int) -> bytes:
    """RTM_GETLINK with NLM_F_DUMP for every family: a header and an all-zero ifinfomsg."""
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def decode(data: bytes) -> list[Message]:
    """The messages in one datagram; for link messages, only the attributes the watcher uses."""
    out: list[Message] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _ = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        body = off + _NLMSGHDR.size
        if kind in (RTM_NEWLINK, RTM_DELLINK) and length >= _NLMSGHDR.size + _IFINFOMSG.size:
            out.append(Message(kind, flags, seq, _link(data, body, off + length)))
        elif kind == NLMSG_ERROR and length >= _NLMSGHDR.size + 4:
            out.append(Message(kind, flags, seq, error=-struct.unpack_from("=i", data, body)[0]))
        else:
            out.append(Message(kind, flags, seq))
        off += (length + 3) & ~3
    return out


def _link(data: bytes, off: int, end: int) -> LinkObservation:
    _, _, index, ifflags, _ = _IFINFOMSG.unpack_from(data, off)
    attrs: dict[int, bytes] = {}
    pos = off + _IFINFOMSG.size
    while pos + _NLATTR.size <= end:
        alen, atype = _NLATTR.unpack_from(data, pos)
        if alen < _NLATTR.size:
            break
        attrs[atype & _NLA_TYPE_MASK] = data[pos + _NLATTR.size:pos + alen]
        pos += (alen + 3) & ~3
    oper = attrs.get(IFLA_OPERSTATE, b"\0")[0]
    return LinkObservation(
        name=_cstr(attrs.get(IFLA_IFNAME, b"")),
        ifindex=index,
        admin_up=bool(ifflags & IFF_UP),
        carrier=attrs.get(IFLA_CARRIER, b"\0")[0] == 1,
        operstate=OPERSTATES[oper] if oper < len(OPERSTATES) else "unknown",
        parent_bus=_cstr(attrs.get(IFLA_PARENT_DEV_BUS_NAME, b"")),
    )


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


class LinkWatcher:
    """Keeps ``links`` (ifindex -> LinkObservation) equal to the kernel's and reports changes.

    ``on_change(before, after, reason)`` runs after each batch of messages that changed anything,
    with the whole table before and after the batch; while it runs, new messages queue in the
    socket and are handled as the next batch, so a storm costs a few callbacks, not one per message.
    """

    def __init__(self, netns: str | None = None, rcvbuf: int = DEFAULT_RCVBUF,
                 resync_s: float = DEFAULT_RESYNC_S, stats: Stats | None = None,
                 opener: Callable[[str | None, int], NetlinkSocket] = open_route_socket) -> None:
        self.netns = netns
        self.rcvbuf = rcvbuf
        self.resync_s = resync_s
        self.stats = stats or Stats()
        self.opener = opener
        self.links: Links = {}
        self.synced = asyncio.Event()  # set once the first full dump is in
        self._seq = 0

    def by_name(self) -> dict[str, LinkObservation]:
        return {o.name: o for o in self.links.values()}

    async def run(self, on_change: OnChange) -> None:
        """Watch until cancelled. Resyncs: at start, on ENOBUFS, and every ``resync_s`` seconds."""
        log.info("watching links", extra=ctx("netlink", self.netns))
        reason = "start"
        delay = 1.0
        while True:
            try:
                sock = self.opener(self.netns, self.rcvbuf)
                try:
                    reason = await self._serve(sock, reason, on_change)
                finally:
                    sock.close()
                delay = 1.0
            except NetlinkOpError as e:
                # Keep serving what we know; try a fresh socket after a pause.
                log.error("link watcher: %s", e, extra=ctx("netlink", self.netns, errno=e.code))
                reason = "error"
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _serve(self, sock: NetlinkSocket, reason: str, on_change: OnChange) -> str:
        """Dump, then follow events on one socket. Returns why a fresh socket is needed."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(sock.fileno(), ready.set)
        try:
            while True:
                if reason != "start":
                    self.stats.inc("netlink_resyncs", reason=reason)
                    # The periodic safety net is routine; an overflow or error is worth a warning.
                    log.log(logging.DEBUG if reason == "periodic" else logging.WARNING,
                            "resyncing link table", extra=ctx("netlink-resync", self.netns, reason=reason))
                before = dict(self.links)
                try:
                    self.links = await self._dump(sock, ready)
                except _Overflow:
                    return "enobufs"
                self.synced.set()
                if self.links != before or reason == "start":
                    await on_change(before, dict(self.links), f"netlink resync ({reason})")
                reason = await self._follow(sock, ready, on_change)
                if reason == "enobufs":
                    return reason
        finally:
            loop.remove_reader(sock.fileno())

    async def _follow(self, sock: NetlinkSocket, ready: asyncio.Event, on_change: OnChange) -> str:
        """Apply events until a resync is due ("periodic") or the queue overflowed ("enobufs")."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self.resync_s
        while True:
            try:
                async with asyncio.timeout_at(due):
                    await ready.wait()
            except TimeoutError:
                return "periodic"
            ready.clear()
            before = dict(self.links)
            try:
                msgs = self._drain(sock)
            except _Overflow:
                return "enobufs"
            for msg in msgs:
                self._apply(self.links, msg)
            if self.links != before:
                changed = sorted({o.name for o in _diff(before, self.links)})
                await on_change(before, dict(self.links), "netlink: " + ",".join(changed))

    async def _dump(self, sock: NetlinkSocket, ready: asyncio.Event) -> Links:
        """A full RTM_GETLINK dump; events arriving meanwhile are applied in order too."""
        while True:
            self._seq += 1
            try:
                sock.send(dump_request(self._seq))
            except OSError as e:
                raise NetlinkOpError("dump", self.netns or "<host>", e.errno or errno.EIO) from e
            table: Links = {}
            interrupted = False
            done = False
            while not done:
                await ready.wait()
                ready.clear()
                for msg in self._drain(sock):
                    if msg.seq == self._seq:
                        interrupted |= bool(msg.flags & NLM_F_DUMP_INTR)
                        if msg.type == NLMSG_DONE:
                            done = True
                            continue
                        if msg.error:
                            raise NetlinkOpError("dump", self.netns or "<host>", msg.error)
                    self._apply(table, msg)
            if not interrupted:
                return table

    def _drain(self, sock: NetlinkSocket) -> list[Message]:
        """Every message queued now. Raises _Overflow when the kernel dropped some."""
        out: list[Message] = []
        while True:
            try:
                data = sock.recv(_RECV_SIZE)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    raise _Overflow from e
                raise NetlinkOpError("recv", self.netns or "<host>", e.errno or errno.EIO) from e
            out.extend(decode(data))

    @staticmethod
    def _apply(table: Links, msg: Message) -> None:
        if msg.link is None:
            return
        if msg.type == RTM_NEWLINK:
            table[msg.link.ifindex] = msg.link
        elif msg.type == RTM_DELLINK:
            table.pop(msg.link.ifindex, None)


class _Overflow(Exception):
    """The socket's receive queue overflowed (ENOBUFS): events were lost."""


def _diff(before: Links, after: Links) -> Iterable[LinkObservation]:
    for idx in before.keys() | after.keys():
        old, new = before.get(idx), after.get(idx)
        if old != new:
            yield from (o for o in (old, new) if o is not None)
