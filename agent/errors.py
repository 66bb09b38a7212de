"""The agent's own error types; adapters translate library and OS errors into these."""

from __future__ import annotations

import errno as _errno
import os


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """An invalid config: names the field (a dotted path) and the offending value."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"config: {field}: {reason} (got {value!r})")


class SysfsError(AgentError):
    """A sysfs read or write failed; carries the path and errno so callers branch on errno."""

    def __init__(self, path: str, errno: int, op: str = "read", hint: str = "") -> None:
        self.path = path
        self.errno = errno
        self.op = op
        self.hint = hint
        name = _errno.errorcode.get(errno, str(errno))
        msg = f"{op} {path}: {name} ({os.strerror(errno)})"
        super().__init__(f"{msg}; {hint}" if hint else msg)


class DeviceNotFoundError(AgentError):
    """A device named in config or a request does not exist on this node."""

    def __init__(self, device: str, detail: str = "") -> None:
        self.device = device
        super().__init__(f"device {device}: not found{': ' + detail if detail else ''}")


class AllocationError(AgentError):
    """An Allocate/PreStart request names a device we cannot hand out."""

    def __init__(self, device: str, reason: str) -> None:
        self.device = device
        self.reason = reason
        super().__init__(f"device {device}: {reason}")


class KubeletRegistrationError(AgentError):
    """Registration with the kubelet failed (not up yet, or it rejected us). ``unreachable``: no
    kubelet answered at all (no socket, connection refused), as opposed to a kubelet saying no."""

    def __init__(self, socket: str, reason: str, unreachable: bool = False) -> None:
        self.socket = socket
        self.reason = reason
        self.unreachable = unreachable
        super().__init__(f"register with kubelet at {socket}: {reason}")


class DevinfoError(AgentError):
    """A device-info file could not be written, read or removed."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"device-info file {path}: {reason}")


class PluginSocketError(AgentError):
    """Our device-plugin socket could not be created (bind failed, path too long, directory gone)."""

    def __init__(self, socket: str, reason: str) -> None:
        self.socket = socket
        self.reason = reason
        super().__init__(f"serve device plugin on {socket}: {reason}")


class NetlinkOpError(AgentError):
    """A netlink request failed; carries the operation, the link and the errno code."""

    def __init__(self, op: str, link: str, code: int) -> None:
        self.op = op
        self.link = link
        self.code = code
        name = _errno.errorcode.get(code, str(code))
        super().__init__(f"netlink {op} on {link}: {name} ({os.strerror(code)})")


class OperationTimeoutError(AgentError):
    """A blocking kernel operation (sysfs write, wait for VFs) did not finish in time."""

    def __init__(self, op: str, device: str, seconds: float, detail: str = "") -> None:
        self.op = op
        self.device = device
        self.seconds = seconds
        super().__init__(f"{op} on {device}: no result after {seconds:g}s{'; ' + detail if detail else ''}")


class ListenError(AgentError):
    """A TCP endpoint (--metrics-address, --health-address) could not be opened."""

    def __init__(self, flag: str, address: str, reason: str) -> None:
        self.flag = flag
        self.address = address
        self.reason = reason
        super().__init__(f"{flag} {address}: cannot listen: {reason}")
