"""A kernel-faithful stand-in for the sysfs writes and rtnetlink VF calls the agent makes.

``SimKernel`` is a SysfsWriter for a simulated node: each write is handled as the kernel's store
function would (drivers/pci/iov.c ``sriov_numvfs_store``, drivers/base/bus.c ``bind_store`` /
``unbind_store`` / ``drivers_probe_store``, drivers/pci/pci-sysfs.c ``driver_override_store``) and
fails with the same errno, in the same order of checks:

* sriov_numvfs: not a u16 -> EINVAL; above sriov_totalvfs -> ERANGE; equal to the current count ->
  success, nothing happens; PF without driver -> ENOENT; non-zero while VFs exist -> EBUSY;
  MMIO exhaustion (injected) -> ENOMEM.
* bind: unknown device or a driver that does not match (driver_override) -> ENODEV; already bound
  -> EBUSY; the driver's probe failed (vfio-pci on a function with no IOMMU group, outside vfio's
  no-IOMMU mode) -> its error, EINVAL. unbind: not bound to that driver -> ENODEV. drivers_probe:
  unknown device -> ENODEV; a failed probe is only logged (the write succeeds, the device stays unbound).
* reset (drivers/pci/pci-sysfs.c ``reset_store``): not a number -> EINVAL, a number other than 1 ->
  EINVAL, else a function-level reset (``pci_reset_function``), recorded in ``resets``. The attribute
  exists only on a function with a reset method (``SimPf.vf_flr`` for VFs), so elsewhere -> ENOENT.
* a read-only attribute -> EACCES; a missing file -> ENOENT.

Timing knobs make it behave like real hardware: a write can take ``write_latency`` seconds, VFs can
appear ``vf_delay`` seconds after the write returns and be probed by their driver ``probe_delay``
seconds later; ``hang_next`` makes the next write to an attribute block until released.
``SimNetlink`` keeps the PF-side VF attributes (mlx5 defaults) and the netdevs' admin state and MTU.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.core.reconcile import VfChange
from agent.errors import NetlinkOpError, SysfsError
from agent.model import PfLink, VfAttrs, is_pci_address
from agent.sim.node import MLX5_DRIVER, MLX_VENDOR, SimNode

_WRITABLE_DEVICE_ATTRS = ("sriov_numvfs", "sriov_drivers_autoprobe", "driver_override", "reset")
_TRUE = ("1", "y", "Y", "on", "On", "ON", "t", "T", "true", "True")
_FALSE = ("0", "n", "N", "off", "Off", "OFF", "f", "F", "false", "False")


@dataclass
class _Hang:
    attr: str
    release: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)


class SimKernel:
    """Handles writes below ``node.sys`` as the kernel would, mutating the tree through ``node``."""

    def __init__(self, node: SimNode, write_latency: float = 0.0, vf_delay: float = 0.0,
                 probe_delay: float = 0.0, netlink: SimNetlink | None = None) -> None:
        self.node = node
        self.netlink = netlink
        self.write_latency = write_latency
        self.vf_delay = vf_delay
        self.probe_delay = probe_delay
        self.writes: list[tuple[str, str]] = []  # (path relative to sys/, value) of every write attempted
        self.kernel_log: list[str] = []  # what the kernel would print to dmesg
        self.resets: list[str] = []  # PCI address of every function-level reset done
        self._inject: dict[tuple[str, str], list[int]] = {}
        self._hangs: dict[str, _Hang] = {}
        self._lock = threading.RLock()
        self._timers: dict[str, list[threading.Timer]] = {}

    # ------------------------------------------------------------ test controls
    def inject(self, address: str, attr: str, err: int, times: int = 1) -> None:
        """Make the next ``times`` writes to <address>/<attr> fail with ``err`` (e.g. ENOMEM)."""
        self._inject.setdefault((address, attr), []).extend([err] * times)

    def hang_next(self, attr_path: str) -> _Hang:
        """The next write whose path ends with ``attr_path`` blocks until ``release`` is set."""
        hang = _Hang(attr_path)
        self._hangs[attr_path] = hang
        return hang

    def count(self, suffix: str = "") -> int:
        return sum(1 for p, _ in self.writes if p.endswith(suffix))

    def rebind(self, address: str, driver: str) -> None:
        """Move a function to ``driver`` with the writes the agent's BindVfDriver makes: unbind from
        its driver, driver_override, drivers_probe (for building a node whose VFs are already bound)."""
        current = _driver(self.node, address)
        if current is not None:
            self.write(self.node.sys / "bus/pci/drivers" / current / "unbind", address)
        self.write(self.node.device_dir(address) / "driver_override", driver)
        self.write(self.node.sys / "bus/pci/drivers_probe", address)

    def settle(self, timeout: float = 10.0) -> None:
        """Wait for delayed VF appearances/probes to finish (for tests and the demo log)."""
        deadline = time.monotonic() + timeout
        for timers in list(self._timers.values()):
            for t in timers:
                t.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------ SysfsWriter
    def write(self, path: Path, value: str) -> None:
        try:
            self.store(path, value)
        except OSError as e:
            raise SysfsError(str(path), e.errno or errno.EIO, op=f"write {value.strip()!r} to") from e

    def store(self, path: Path, value: str) -> None:
        """One write(2) to a sysfs file: returns or raises OSError with the kernel's errno."""
        rel = os.path.relpath(path, self.node.sys)
        self.writes.append((rel, value))
        for suffix, hang in list(self._hangs.items()):
            if rel.endswith(suffix):
                del self._hangs[suffix]
                hang.entered.set()
                hang.release.wait()
        if not os.path.lexists(path):
            raise _err(errno.ENOENT, path)
        parts = rel.split("/")
        with self._lock:
            if parts[:3] == ["bus", "pci", "drivers_probe"]:
                return self._drivers_probe(value.strip())
            if parts[:3] == ["bus", "pci", "drivers"] and len(parts) == 5:
                return self._driver_attr(parts[3], parts[4], value.strip(), path)
            address, attr = parts[-2], parts[-1]
            if not is_pci_address(address) or attr not in _WRITABLE_DEVICE_ATTRS:
                raise _err(errno.EACCES, path)
            injected = self._inject.get((address, attr))
            if injected:
                raise _err(injected.pop(0), path)
            if attr == "sriov_numvfs":
                return self._sriov_numvfs(address, value, path)
            if attr == "sriov_drivers_autoprobe":
                return self._drivers_autoprobe(address, value, path)
            if attr == "driver_override":
                text = value[:-1] if value.endswith("\n") else value
                Path(path).write_text(f"{text or '(null)'}\n")
                return None
            return self._reset(address, value, path)

    def _reset(self, address: str, value: str, path: Path) -> None:
        n = _kstrtoul(value)
        if n is None or n != 1:
            raise _err(errno.EINVAL, path)
        if self.write_latency:
            time.sleep(self.write_latency)
        self.resets.append(address)

    # ------------------------------------------------------------ SR-IOV
    def _sriov_numvfs(self, address: str, value: str, path: Path) -> None:
        text = value[:-1] if value.endswith("\n") else value
        try:
            n = int(text, 0)
        except ValueError:
            raise _err(errno.EINVAL, path) from None
        if not 0 <= n <= 0xFFFF:
            raise _err(errno.EINVAL, path)
        pf = self.node.pf(address)
        if n > pf.totalvfs:
            raise _err(errno.ERANGE, path)
        if n == pf.numvfs:
            return
        if _driver(self.node, address) is None:
            self.kernel_log.append(f"pci {address}: no driver bound to device; cannot configure SR-IOV")
            raise _err(errno.ENOENT, path)
        if self.write_latency:
            time.sleep(self.write_latency)
        if n == 0:
            for t in self._timers.pop(address, []):
                t.cancel()
            self.node.remove_vfs(address)
            if self.netlink is not None:
                self.netlink.forget_vfs(pf.netdev)
            return
        if pf.numvfs:
            self.kernel_log.append(f"pci {address}: {pf.numvfs} VFs already enabled. "
                                   f"Disable before enabling {n} VFs")
            raise _err(errno.EBUSY, path)
        autoprobe = _read(self.node.device_dir(address) / "sriov_drivers_autoprobe") != "0"
        pf.numvfs = n
        Path(path).write_text(f"{n}\n")
        if self.vf_delay:
            self._later(address, self.vf_delay, lambda: self._add_vfs(address, n, autoprobe))
        else:
            self._add_vfs(address, n, autoprobe)

    def _add_vfs(self, address: str, n: int, autoprobe: bool) -> None:
        with self._lock:
            if self.node.pf(address).numvfs != n:
                return  # disabled again before the VFs showed up
            created = self.node.create_vfs(address, n, autoprobe=autoprobe and not self.probe_delay)
        if autoprobe and self.probe_delay:
            self._later(address, self.probe_delay, lambda: self._probe_all(address, created))

    def _probe_all(self, address: str, vfs: list[str]) -> None:
        with self._lock:
            for vf in vfs:
                if self.node.device_dir(vf).exists() and _driver(self.node, vf) is None:
                    self._probe(vf)

    def _later(self, address: str, delay: float, fn: Callable[[], None]) -> None:
        t = threading.Timer(delay, fn)
        t.daemon = True
        self._timers.setdefault(address, []).append(t)
        t.start()

    def _drivers_autoprobe(self, address: str, value: str, path: Path) -> None:
        text = value.strip()
        if text in _TRUE:
            Path(path).write_text("1\n")
        elif text in _FALSE:
            Path(path).write_text("0\n")
        else:
            raise _err(errno.EINVAL, path)

    # ------------------------------------------------------------ driver core
    def _driver_attr(self, driver: str, attr: str, address: str, path: Path) -> None:
        if attr == "bind":
            if not self.node.device_dir(address).exists() or not self._matches(address, driver):
                raise _err(errno.ENODEV, path)
            if _driver(self.node, address) is not None:
                raise _err(errno.EBUSY, path)
            try:
                self._probe(address, driver)
            except OSError as e:
                raise _err(e.errno or errno.EINVAL, path) from None
        elif attr == "unbind":
            if not self.node.device_dir(address).exists() or _driver(self.node, address) != driver:
                raise _err(errno.ENODEV, path)
            self.node.unprobe(address)
        else:
            raise _err(errno.EACCES, path)

    def _drivers_probe(self, address: str) -> None:
        if not is_pci_address(address) or not self.node.device_dir(address).exists():
            raise _err(errno.ENODEV, self.node.sys / "bus/pci/drivers_probe")
        if _driver(self.node, address) is not None:
            return
        override = _read(self.node.device_dir(address) / "driver_override")
        if override and override != "(null)":
            if (self.node.sys / "bus/pci/drivers" / override).is_dir():
                try:
                    self._probe(address, override)
                except OSError as e:  # really_probe logs it; drivers_probe still succeeds
                    self.kernel_log.append(f"{override} {address}: probe failed with error -{e.errno}")
            return
        if self._matches(address, MLX5_DRIVER):
            self._probe(address, MLX5_DRIVER)

    def _matches(self, address: str, driver: str) -> bool:
        """pci_bus_match: driver_override wins; else the driver's ID table (mlx5_core: Mellanox)."""
        override = _read(self.node.device_dir(address) / "driver_override")
        if override and override != "(null)":
            return override == driver
        return driver == MLX5_DRIVER and _read(self.node.device_dir(address) / "vendor") == f"0x{MLX_VENDOR}"

    def _probe(self, address: str, driver: str = MLX5_DRIVER) -> None:
        if os.path.lexists(self.node.device_dir(address) / "physfn"):
            self.node.probe_vf(address, driver)
        else:
            self.node.bind(address, driver)


class SimNetlink:
    """rtnetlink as seen on a simulated node: PF-side VF attributes, admin state and MTU."""

    def __init__(self, node: SimNode, eswitch: str | None = "legacy") -> None:
        self.node = node
        self.eswitch = eswitch
        self.calls: list[tuple[str, str, object]] = []  # (op, ifname, args) of every change request
        self._vfs: dict[tuple[str, int], VfAttrs] = {}
        self._admin: dict[str, bool] = {}
        self._lock = threading.Lock()

    def _netdev_dir(self, ifname: str) -> Path:
        d = self.node.sys / "class/net" / ifname
        if not d.exists():
            raise NetlinkOpError("get", ifname, errno.ENODEV)
        return d

    def _pf_of(self, ifname: str) -> str:
        for pf in self.node.pfs:
            if pf.netdev == ifname:
                return pf.pci_address
        raise NetlinkOpError("setlink vf", ifname, errno.EOPNOTSUPP)

    def admin_up(self, ifname: str) -> bool:
        d = self._netdev_dir(ifname)
        return self._admin.get(ifname, _read(d / "operstate") == "up")

    def read_pf(self, ifname: str) -> PfLink:
        d = self._netdev_dir(ifname)
        pf = self.node.pf(self._pf_of(ifname))
        with self._lock:
            vfs = tuple(self._vfs.get((ifname, i), _mlx5_default(i))
                        for i in range(pf.numvfs))
        return PfLink(ifname, int(_read(d / "ifindex") or 0), int(_read(d / "mtu") or 0),
                      self.admin_up(ifname), vfs)

    def set_vf(self, ifname: str, vf: int, change: VfChange) -> None:
        self.calls.append(("set_vf", ifname, (vf, change)))
        pf = self.node.pf(self._pf_of(ifname))
        if not 0 <= vf < pf.numvfs:
            raise NetlinkOpError("setlink vf", ifname, errno.EINVAL)
        with self._lock:
            cur = self._vfs.get((ifname, vf), _mlx5_default(vf))
            vals = {k: v for k, v in change.items().items() if k in VfAttrs.__dataclass_fields__}
            self._vfs[(ifname, vf)] = VfAttrs(**{**cur.__dict__, **vals})

    def set_mtu(self, ifname: str, mtu: int) -> None:
        self.calls.append(("set_mtu", ifname, mtu))
        (self._netdev_dir(ifname) / "mtu").write_text(f"{mtu}\n")

    def set_up(self, ifname: str) -> None:
        self.calls.append(("set_up", ifname, True))
        self._netdev_dir(ifname)
        self._admin[ifname] = True

    def set_down(self, ifname: str) -> None:
        """Test control: an operator ran `ip link set <pf> down`."""
        self._netdev_dir(ifname)
        self._admin[ifname] = False

    def eswitch_mode(self, pci_address: str) -> str | None:
        return self.eswitch

    def forget_vfs(self, ifname: str) -> None:
        """VF attributes reset when the VFs are destroyed (as the driver frees its vport state)."""
        with self._lock:
            for key in [k for k in self._vfs if k[0] == ifname]:
                del self._vfs[key]


def _mlx5_default(index: int) -> VfAttrs:
    """A fresh mlx5 VF: no admin MAC, spoof checking off, link-state auto, trust off, no rate limit."""
    return VfAttrs(index, "00:00:00:00:00:00", trust=False, spoofchk=False, link_state="auto",
                   vlan=0, qos=0, min_tx_rate=0, max_tx_rate=0)


def _kstrtoul(value: str) -> int | None:
    """kstrtoul(buf, 0, ...): an optional '+', 0x for hex, a leading 0 for octal, one trailing newline."""
    text = value[:-1] if value.endswith("\n") else value
    text = text.removeprefix("+")
    base = 16 if text[:2].lower() == "0x" else 8 if len(text) > 1 and text[0] == "0" else 10
    digits = text[2:] if base == 16 else text
    if not digits or not digits.isalnum():
        return None
    try:
        return int(digits, base)
    except ValueError:
        return None


def _driver(node: SimNode, address: str) -> str | None:
    link = node.device_dir(address) / "driver"
    return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _err(code: int, path: Path | str) -> OSError:
    return OSError(code, os.strerror(code), str(path))
