"""The agent's own error types; adapters translate library and OS errors into these."""

from __future__ import annotations

import errno as _errno
import os
import reprlib

# Length of values echoed into errors and logs: enough to recognise a value, never a flood.
SHORT = 80

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = 4
_REPR.maxstring = _REPR.maxother = SHORT
_REPR.maxlong = 40


def shorten(value: object, limit: int = SHORT, *, quote: bool = False) -> str:
    """``value`` as bounded text for an error message or a log line.

    Values from outside (config fields, request IDs, sysfs contents) may be megabytes long or, through
    YAML aliases, a structure whose full repr is exponential: never format one whole. A printable
    string is shown as it is (as a repr with ``quote``), anything else as a depth- and length-bounded
    repr; text past ``limit`` is cut, with the full length of a string noted.
    """
    if isinstance(value, str):
        head = value[:limit]
        text = repr(head) if quote or not head.isprintable() else head
        cut = len(value) > limit
    else:
        text = _REPR.repr(value)
        cut = False
    if len(text) > limit:
        text, cut = text[:limit], True
    if not cut:
        return text
    return f"{text}...({len(value)} chars)" if isinstance(value, str) else f"{text}..."


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """An invalid config: names the field (a dotted path) and the offending value."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = shorten(field, 2 * SHORT)
        self.value = value
        self.reason = reason
        super().__init__(f"config: {self.field}: {reason} (got {shorten(value, quote=True)})")


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


class SysfsContentError(SysfsError):
    """A sysfs file holds what no kernel writes there (binary bytes, a non-number where the kernel
    prints one, more than a sysfs attribute can hold): the device it belongs to cannot be trusted."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(path, _errno.EBADMSG, hint=detail)


class DeviceNotFoundError(AgentError):
    """A device named in config or a request does not exist on this node."""

    def __init__(self, device: str, detail: str = "") -> None:
        self.device = shorten(device)
        super().__init__(f"device {self.device}: not found{': ' + detail if detail else ''}")


class AllocationError(AgentError):
    """An Allocate/PreStart request names a device we cannot hand out (the ID is kept short: it comes
    from the client and is echoed back in the gRPC status and the log)."""

    def __init__(self, device: str, reason: str) -> None:
        self.device = shorten(device)
        self.reason = reason
        super().__init__(f"device {self.device}: {reason}")


class KubeletRegistrationError(AgentError):
    """Registration with the kubelet failed (not up yet, or it rejected us). ``unreachable``: no
    kubelet answered at all (no socket, connection refused), as opposed to a kubelet saying no."""

    def __init__(self, socket: str, reason: str, unreachable: bool = False) -> None:
        self.socket = socket
        self.reason = reason
        self.unreachable = unreachable
        super().__init__(f"register with kubelet at {socket}: {reason}")


class PluginSocketWipedError(AgentError):
    """Our plugin socket vanished between our check and the Register we were about to send: a
    kubelet starting wipes every socket before it listens. Nothing was sent; serve again first."""

    def __init__(self, socket: str) -> None:
        self.socket = socket
        super().__init__(f"{socket}: deleted before Register was sent (a kubelet starting)")


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


class UndeclaredCounterError(LookupError):
    """An event counter used with a name or label set that agent.stats.COUNTERS does not declare.

    A bug in the agent, not a surprise from the node: deliberately not an AgentError, so no handler
    meant for bad input or kernel errors quietly absorbs it."""

    def __init__(self, counter: str, labels: tuple[str, ...],
                 declared: tuple[str, ...] | None = None) -> None:
        self.counter = counter
        self.labels = labels
        self.declared = declared
        got = ", ".join(labels) or "no labels"
        if declared is None:
            msg = f"counter {counter!r} is not declared in agent.stats.COUNTERS (labels: {got})"
        else:
            msg = f"counter {counter!r} declares labels ({', '.join(declared)}), got ({got})"
        super().__init__(msg)
