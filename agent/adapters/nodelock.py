"""One agent per node: an abstract unix socket as the lock, taken before any other socket.

Two agents on one node delete each other's plugin sockets and make registrations flap. An
abstract unix socket name (Linux, no file) is unique per network namespace and is released by
the kernel the moment its holder dies, however it dies: no stale lock file after a SIGKILL. With
``hostNetwork: true`` the pod shares the host's network namespace, so the lock is node-wide; two
agents in different network namespaces do not see each other's lock.

The name is derived from the device-plugin directory, the resource the agents would fight over.
The holder listens and closes every connection at once; a connecting second agent learns the
holder's pid from SO_PEERCRED (credentials of the listening process).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct

from agent.errors import AgentError

LOCK_PREFIX = "sriov-rdma-agent:"
_MAX_NAME = 107  # sun_path minus the leading NUL of an abstract name
_UCRED = struct.Struct("3i")  # pid, uid, gid


class AlreadyRunningError(AgentError):
    """Another agent holds the node lock."""

    def __init__(self, name: str, pid: int | None) -> None:
        self.name = name
        self.pid = pid
        holder = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"another sriov-rdma-agent ({holder}) already serves this node (lock @{name}); "
                         "exiting without touching its sockets")


def lock_name(device_plugin_dir: str) -> str:
    """@sriov-rdma-agent:<absolute device-plugin dir>, hashed if it would not fit."""
    name = LOCK_PREFIX + os.path.abspath(device_plugin_dir)
    if len(name.encode()) > _MAX_NAME:
        name = LOCK_PREFIX + hashlib.sha256(name.encode()).hexdigest()[:32]
    return name


class NodeLock:
    """Held from acquire() until close() or the process ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._sock: socket.socket | None = None

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunningError naming the holder."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + self.name)
        except OSError:
            sock.close()
            raise AlreadyRunningError(self.name, holder_pid(self.name)) from None
        sock.listen(8)
        sock.setblocking(False)
        self._sock = sock

    def serve(self) -> None:
        """Answer connecting agents (they read our pid from the connection) from the running loop."""
        sock = self._sock
        if sock is None:
            return
        asyncio.get_running_loop().add_reader(sock.fileno(), _accept_and_close, sock)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing registered with one
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


def holder_pid(name: str) -> int | None:
    """The pid of whoever listens on the abstract name, or None if it cannot be learnt."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect("\0" + name)
            raw = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError:
            return None
    pid, _, _ = _UCRED.unpack(raw)
    return pid or None


def _accept_and_close(sock: socket.socket) -> None:
    try:
        conn, _ = sock.accept()
    except OSError:
        return
    conn.close()
