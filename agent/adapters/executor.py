"""Applies reconcile actions to the node through two ports: sysfs writes and rtnetlink.

Every kernel call runs in its own worker thread with a timeout, so a hung write never blocks the
event loop (ListAndWatch, health, metrics keep being served). A kernel write cannot be cancelled:
a timed-out thread is left to finish on its own and its PF gets no further writes until it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from agent.adapters.sysfs import SysfsHost
from agent.core.kinds.vfio import VFIO_DRIVER
from agent.core.reconcile import (
    Action,
    BindVfDriver,
    Refuse,
    SetDriversAutoprobe,
    SetLinkUp,
    SetMtu,
    SetNumVfs,
    SetVfAttrs,
    VfChange,
    WaitForVfs,
    Warn,
)
from agent.errors import AgentError, NetlinkOpError, OperationTimeoutError, SysfsError
from agent.logs import ctx
from agent.model import PfLink

log = logging.getLogger(__name__)

T = TypeVar("T")


class VfNetlinkPort(Protocol):
    """rtnetlink/devlink as the executor and the reconcile's read of the node need it (real:
    PyrouteVfNetlink)."""

    def read_pf(self, ifname: str) -> PfLink: ...

    def set_vf(self, ifname: str, vf: int, change: VfChange) -> None: ...

    def set_mtu(self, ifname: str, mtu: int) -> None: ...

    def set_up(self, ifname: str) -> None: ...

    def eswitch_mode(self, pci_address: str) -> str | None: ...


@dataclass(frozen=True)
class Timeouts:
    """Defaults follow the SR-IOV network operator: 2 min per sriov_numvfs write, 2 min for VFs."""

    sysfs_write: float = 120.0
    vf_wait: float = 120.0
    netlink: float = 10.0
    backoff_first: float = 0.02
    backoff_max: float = 1.0


class Executor:
    def __init__(self, sysfs: SysfsHost, netlink: VfNetlinkPort, timeouts: Timeouts | None = None) -> None:
        self.sysfs = sysfs
        self.netlink = netlink
        self.timeouts = timeouts or Timeouts()
        self._stuck: dict[str, tuple[threading.Thread, str]] = {}  # PF -> (hung thread, what it does)

    async def call(self, pf: str, what: str, timeout: float, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a fresh daemon thread; give up waiting after ``timeout`` seconds."""
        stuck = self._stuck.get(pf)
        if stuck is not None:
            if stuck[0].is_alive():
                raise OperationTimeoutError(what, pf, 0, f"an earlier operation ({stuck[1]}) is still hung")
            del self._stuck[pf]
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def settle(ok: bool, value: object) -> None:
            if fut.done():
                return
            if ok:
                fut.set_result(value)  # type: ignore[arg-type]
            else:
                assert isinstance(value, BaseException)
                fut.set_exception(value)

        def work() -> None:
            try:
                result: object = fn()
                ok = True
            except BaseException as e:  # handed to the awaiting coroutine
                result, ok = e, False
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(settle, ok, result)

        thread = threading.Thread(target=work, name=f"kernel-{pf}", daemon=True)
        thread.start()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for returns the result of a future that finished
            # just as the caller was cancelled, swallowing the cancellation (a shutdown then never ends).
            async with asyncio.timeout(timeout):
                return await asyncio.shield(fut)
        except TimeoutError:
            self._stuck[pf] = (thread, what)
            fut.add_done_callback(functools.partial(_late, pf, what))
            raise OperationTimeoutError(what, pf, timeout, "the kernel call is still blocked") from None
        except asyncio.CancelledError:  # shutting down: the thread's outcome is of no interest
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise

    def hung(self, pf: str) -> str | None:
        """What is still hung on this PF, if anything."""
        stuck = self._stuck.get(pf)
        return stuck[1] if stuck is not None and stuck[0].is_alive() else None

    async def apply(self, action: Action) -> None:
        """Apply one action; raises SysfsError, NetlinkOpError or OperationTimeoutError."""
        t = self.timeouts
        match action:
            case SetDriversAutoprobe(pf=pf, enabled=enabled):
                value = "1" if enabled else "0"
                await self._write(pf, self.sysfs.pci_dir(pf) / "sriov_drivers_autoprobe", value)
            case SetNumVfs(pf=pf, count=count):
                await self._write(pf, self.sysfs.pci_dir(pf) / "sriov_numvfs", str(count))
            case WaitForVfs(pf=pf, count=count, probed=probed):
                await self.wait_for_vfs(pf, count, probed)
            case SetMtu(pf=pf, ifname=ifname, mtu=mtu):
                await self.call(pf, f"set MTU of {ifname}", t.netlink,
                                lambda: self.netlink.set_mtu(ifname, mtu))
            case SetLinkUp(pf=pf, ifname=ifname):
                await self.call(pf, f"set {ifname} up", t.netlink, lambda: self.netlink.set_up(ifname))
            case SetVfAttrs(pf=pf, ifname=ifname, vf=vf, change=change):
                await self.call(pf, f"set VF {vf} attributes", t.netlink,
                                lambda: self.netlink.set_vf(ifname, vf, change))
            case BindVfDriver():
                await self._bind(action)
            case Refuse() | Warn():
                pass

    async def flr(self, pf: str, vf_pci: str) -> None:
        """Function-level reset of one VF: "1" to its sysfs ``reset`` (pci_reset_function: the
        kernel saves and restores config space and tells the bound driver around the reset)."""
        await self._write(pf, self.sysfs.pci_dir(vf_pci) / "reset", "1")

    async def _write(self, pf: str, path: Path, value: str) -> None:
        await self.call(pf, f"write {value!r} to {path}", self.timeouts.sysfs_write,
                        lambda: self.sysfs.write(path, value))

    async def _bind(self, a: BindVfDriver) -> None:
        """driver_override + drivers_probe, as the SR-IOV operator binds a VF to a chosen driver."""
        sys = self.sysfs.sys / "bus/pci"
        if a.current is not None:
            await self._write(a.pf, sys / "drivers" / a.current / "unbind", a.vf_pci)
        await self._write(a.pf, self.sysfs.pci_dir(a.vf_pci) / "driver_override", a.driver)
        await self._write(a.pf, sys / "drivers_probe", a.vf_pci)
        bound = self.sysfs.driver_of(a.vf_pci)
        if bound != a.driver:
            iommu = (" and is the IOMMU on (or vfio's no-IOMMU mode, vfio.enable_unsafe_noiommu_mode=1)?"
                     if a.driver == VFIO_DRIVER else "?")
            raise SysfsError(str(sys / "drivers_probe"), errno.ENODEV, op=f"probe {a.vf_pci} with",
                             hint=f"the VF is bound to {bound or 'no driver'}, not {a.driver}; is the "
                                  f"{a.driver} module loaded (Talos: machine.kernel.modules){iommu}")

    async def wait_for_vfs(self, pf: str, count: int, probed: bool) -> None:
        """Wait (backing off) until ``count`` VFs exist and, if ``probed``, are bound with their devices."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.vf_wait
        delay = self.timeouts.backoff_first
        missing = ""
        while True:
            missing = await self.call(pf, "inspect VFs", self.timeouts.netlink,
                                      lambda: self._vfs_missing(pf, count, probed))
            if not missing:
                return
            left = deadline - loop.time()
            if left <= 0:
                raise OperationTimeoutError(f"wait for {count} VFs", pf, self.timeouts.vf_wait, missing)
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, self.timeouts.backoff_max)

    def _vfs_missing(self, pf: str, count: int, probed: bool) -> str:
        """What is still missing, in words ("" when all VFs are there)."""
        links = self.sysfs.vf_links(pf)
        if len(links) < count:
            return f"{len(links)} of {count} virtfn links"
        for index, addr in links:
            d = self.sysfs.pci_dir(addr)
            if not (d / "physfn").is_symlink():
                return f"VF {index} ({addr}) has no physfn link yet"
            if not probed:
                continue
            driver = self.sysfs.driver_of(addr)
            if driver is None:
                return f"VF {index} ({addr}) is not bound to a driver yet"
            if driver == "mlx5_core" and not (
                    self.sysfs.children(addr, "net") or self.sysfs.children(addr, "infiniband")):
                return f"VF {index} ({addr}) has no netdev or RDMA device yet"
        return ""


def _late(pf: str, what: str, fut: asyncio.Future[object]) -> None:
    """A timed-out kernel call finally returned: say how it ended (nobody awaits it any more)."""
    err = fut.exception()
    if err is None:
        log.warning("hung operation finished late: %s", what, extra=ctx("kernel-call", pf, pf=pf))
    else:
        log.warning("hung operation failed late: %s: %s", what, err, extra=ctx("kernel-call", pf, pf=pf))


def error_reason(exc: AgentError) -> tuple[str, str]:
    """(metric reason label, operator hint) for an error raised while applying an action."""
    if isinstance(exc, OperationTimeoutError):
        return ("write_hung" if "write" in exc.op else "timeout"), (
            "the kernel did not answer in time; the agent keeps serving and retries on the next reconcile")
    if isinstance(exc, NetlinkOpError):
        return f"netlink_{errno.errorcode.get(exc.code, str(exc.code)).lower()}", ""
    if isinstance(exc, SysfsError):
        numvfs = exc.path.endswith("sriov_numvfs")
        hints = {
            errno.EBUSY: ("vfs_busy", "VFs are already enabled (EBUSY): sriov_numvfs must go through 0"),
            errno.ERANGE: ("over_totalvfs",
                           "above sriov_totalvfs: raise NUM_OF_VFS with mstconfig and reboot"),
            errno.ENOMEM: ("pci_resources", "not enough PCI MMIO space for the VFs: boot with pci=realloc "
                                            "(Talos: a kernel argument in the boot assets)"),
            errno.EACCES: ("sysfs_readonly", "/sys is read-only here: the agent must run privileged"),
            errno.EROFS: ("sysfs_readonly", "/sys is read-only here: the agent must run privileged"),
            errno.EPERM: ("sysfs_readonly", "/sys is read-only here: the agent must run privileged"),
        }
        if exc.errno == errno.ENOENT and numvfs:
            return "no_pf_driver", "the PF has no driver that supports SR-IOV (ENOENT): bind mlx5_core"
        if exc.errno in hints:
            return hints[exc.errno]
        return f"sysfs_{errno.errorcode.get(exc.errno, str(exc.errno)).lower()}", exc.hint
    return "error", ""
