"""Device add/remove/bind/unbind events for PCI functions, netdevs and RDMA devices.

Two sources, same events. With the host's /run/udev mounted, pyudev's monitor on the "udev"
group delivers events after udevd processed them. Without it (libudev then silently receives
nothing) we read the kernel's own uevent group on a NETLINK_KOBJECT_UEVENT socket; that needs no
udevd at all, and /dev/infiniband nodes already exist when it fires because devtmpfs creates them
in the kernel. Either way the socket is read from the asyncio loop (no polling thread).
pyudev (libudev through ctypes) and pyroute2 (for another network namespace) are imported only
where they are used: a node without /run/udev never needs either.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from agent.errors import NetlinkOpError
from agent.logs import ctx
from agent.stats import Stats

log = logging.getLogger(__name__)

SUBSYSTEMS = ("pci", "net", "infiniband", "infiniband_verbs", "infiniband_mad")
ACTIONS = frozenset({"add", "remove", "bind", "unbind", "move", "change"})
NETLINK_KOBJECT_UEVENT = 15  # linux/netlink.h
KERNEL_GROUP = 1
UDEV_GROUP = 2
_LIBUDEV_MAGIC = b"libudev\x00"
# libudev's monitor_netlink_header: prefix[8], magic, header_size, properties_off, properties_len,
# filter_subsystem_hash, filter_devtype_hash, filter_tag_bloom_hi, filter_tag_bloom_lo (40 bytes)
_LIBUDEV_HEADER = struct.Struct("8sIIIIIIII")
_RECV_SIZE = 1 << 16

Source = Literal["udev", "kernel"]


@dataclass(frozen=True)
class DeviceEvent:
    """One uevent of interest: ``name`` is the kernel name (PCI address, ifname, mlx5_N, uverbsN)."""

    action: str
    subsystem: str
    devpath: str
    name: str
    driver: str = ""
    old_name: str = ""  # for "move" (a rename): the previous kernel name

    @property
    def virtual(self) -> bool:
        """Not backed by hardware (veths, bridges): a node makes these for every pod."""
        return self.devpath.startswith("/devices/virtual/")

    def matters(self, watched: Collection[str]) -> bool:
        """Hardware events always count; virtual ones only if they name a device we watch."""
        return not self.virtual or self.name in watched or self.old_name in watched

    def describe(self) -> str:
        return f"uevent {self.subsystem} {self.action} {self.name}"


def event_from_properties(props: Mapping[str, str]) -> DeviceEvent | None:
    """The DeviceEvent a uevent's properties describe, or None if it is not one we follow."""
    action = props.get("ACTION", "")
    subsystem = props.get("SUBSYSTEM", "")
    devpath = props.get("DEVPATH", "")
    if action not in ACTIONS or subsystem not in SUBSYSTEMS or not devpath:
        return None
    name = props.get("INTERFACE") if subsystem == "net" else None
    old = props.get("DEVPATH_OLD", "")
    return DeviceEvent(action=action, subsystem=subsystem, devpath=devpath,
                       name=name or devpath.rstrip("/").rsplit("/", 1)[-1],
                       driver=props.get("DRIVER", ""),
                       old_name=old.rstrip("/").rsplit("/", 1)[-1] if old else "")


def parse_datagram(data: bytes) -> dict[str, str] | None:
    """Properties of one uevent datagram, kernel ("add@/devices/...\\0K=V\\0...") or libudev framed."""
    if data.startswith(_LIBUDEV_MAGIC):
        if len(data) < _LIBUDEV_HEADER.size:
            return None
        _, _, _, off, length, *_ = _LIBUDEV_HEADER.unpack_from(data)
        fields = data[off:off + length].split(b"\x00")
    else:
        head, sep, rest = data.partition(b"\x00")
        if not sep or b"@" not in head:
            return None
        fields = rest.split(b"\x00")
    props: dict[str, str] = {}
    for f in fields:
        key, eq, value = f.partition(b"=")
        if eq and key:
            props[key.decode(errors="replace")] = value.decode(errors="replace")
    return props


class UeventSocket(Protocol):
    def fileno(self) -> int: ...
    def recv(self, bufsize: int) -> bytes: ...
    def close(self) -> None: ...


def open_uevent_socket(netns: str | None, group: int = KERNEL_GROUP) -> socket.socket:
    """A non-blocking NETLINK_KOBJECT_UEVENT socket on ``group``, in ``netns`` if given.

    Uevents of network devices reach only sockets in the device's own network namespace;
    PCI and RDMA device events reach every namespace.
    """
    try:
        if netns is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT)
        else:
            from pyroute2 import netns as pr_netns  # noqa: PLC0415 (lazy: see the module docstring)

            sock = pr_netns.create_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW,
                                          NETLINK_KOBJECT_UEVENT, flags=0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, group))
        sock.setblocking(False)
    except OSError as e:
        raise NetlinkOpError("uevent open", netns or "<host>", e.errno or errno.EIO) from e
    return sock


def choose_source(run_udev: str = "/run/udev") -> Source:
    """pyudev's udev source when udevd's control socket is visible, else the kernel's uevents."""
    return "udev" if os.path.exists(os.path.join(run_udev, "control")) else "kernel"


OnEvents = Callable[[list[DeviceEvent], bool], Awaitable[None]]


class UeventWatcher:
    """Feeds batches of DeviceEvents to ``on_events(events, overflowed)``.

    ``overflowed`` is True when the receive queue overflowed and events were lost: the caller
    must then re-read everything instead of trusting the batch.
    """

    def __init__(self, source: Source | None = None, netns: str | None = None, stats: Stats | None = None,
                 opener: Callable[[str | None, int], UeventSocket] = open_uevent_socket) -> None:
        self.source: Source = source or choose_source()
        self.netns = netns
        self.stats = stats or Stats()
        self.opener = opener
        self.ready = asyncio.Event()  # set once the socket is bound

    async def run(self, on_events: OnEvents) -> None:
        log.info("watching %s uevents", self.source, extra=ctx("uevent", self.netns))
        if self.source == "udev":
            await self._run_pyudev(on_events)
        else:
            await self._run_socket(on_events)

    async def _run_socket(self, on_events: OnEvents) -> None:
        sock = self.opener(self.netns, KERNEL_GROUP)
        try:
            await self._pump(sock.fileno(), lambda: _recv_all(sock), on_events)
        finally:
            sock.close()

    async def _run_pyudev(self, on_events: OnEvents) -> None:
        import pyudev  # noqa: PLC0415 (lazy: see the module docstring)

        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
        for subsystem in SUBSYSTEMS:
            monitor.filter_by(subsystem)
        monitor.start()

        def read() -> tuple[list[dict[str, str]], bool]:
            out: list[dict[str, str]] = []
            try:
                while (device := monitor.poll(timeout=0)) is not None:
                    out.append({**dict(device.properties), "ACTION": device.action or ""})
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    return out, True
                raise
            return out, False

        await self._pump(monitor.fileno(), read, on_events)

    async def _pump(self, fd: int, read: Callable[[], tuple[list[dict[str, str]], bool]],
                    on_events: OnEvents) -> None:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        loop.add_reader(fd, wake.set)
        self.ready.set()
        try:
            while True:
                await wake.wait()
                wake.clear()
                props, overflowed = read()
                events = [e for e in map(event_from_properties, props) if e is not None]
                if overflowed:
                    self.stats.inc("netlink_resyncs", reason="uevent-enobufs")
                if events or overflowed:
                    await on_events(events, overflowed)
        finally:
            loop.remove_reader(fd)


def _recv_all(sock: UeventSocket) -> tuple[list[dict[str, str]], bool]:
    """Every datagram queued now, parsed; True as second item if the queue overflowed."""
    out: list[dict[str, str]] = []
    while True:
        try:
            data = sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return out, False
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                return out, True
            raise NetlinkOpError("uevent recv", "<uevent>", e.errno or errno.EIO) from e
        props = parse_datagram(data)
        if props is not None:
            out.append(props)


def describe(events: list[DeviceEvent]) -> str:
    return ", ".join(e.describe() for e in events[:3]) + (" ..." if len(events) > 3 else "")
