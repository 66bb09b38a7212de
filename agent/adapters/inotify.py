"""Linux inotify through ctypes, integrated with asyncio (the kernel tells us; we do not poll)."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import struct
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from agent.errors import SysfsError

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_EVENT = struct.Struct("iIII")
# The process's own symbols, libc's among them: ctypes.util.find_library("c") would run
# `ldconfig -p` in a child process at every start (5-9 ms before the agent can register).
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class InotifyEvent:
    wd: int
    mask: int
    name: str


class Inotify:
    """One inotify instance; add directory watches, then iterate events asynchronously."""

    def __init__(self) -> None:
        fd: int = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise SysfsError("inotify_init1", err, op="create")
        self.fd: int = fd
        self.paths: dict[int, str] = {}

    def watch(self, path: str, mask: int) -> int:
        wd: int = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise SysfsError(path, ctypes.get_errno() or errno.EIO, op="inotify watch")
        self.paths[wd] = path
        return wd

    def read_events(self) -> list[InotifyEvent]:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out = []
        off = 0
        while off + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, off)
            off += _EVENT.size
            name = data[off:off + length].rstrip(b"\0").decode(errors="replace")
            off += length
            out.append(InotifyEvent(wd, mask, name))
        return out

    async def events(self) -> AsyncGenerator[InotifyEvent, None]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        fd = self.fd  # the reader is removed by the fd it was added for, even after close()
        loop.add_reader(fd, ready.set)
        try:
            while True:
                await ready.wait()
                ready.clear()
                for ev in self.read_events():
                    yield ev
        finally:
            loop.remove_reader(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
