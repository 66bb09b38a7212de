"""Reading (and writing) the host's sysfs under an injectable root.

Everything here is a thin translation of files into model values; OSErrors become SysfsError
with the path and errno. No decisions are made here: core/ decides.

Nothing read here is trusted: a read takes at most one page (``MAX_ATTR_BYTES``, what a sysfs
attribute can hold), never blocks on a FIFO, and a file holding what no kernel writes (binary bytes,
a non-number in ``sriov_numvfs``) or a symlink loop is a SysfsError naming the path. Such an error
belongs to one device: a listing marks that device, a PF read leaves out that VF's details and marks
it (``VfInfo.error``), and every other device is read as usual.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Protocol

from agent.errors import SysfsContentError, SysfsError, shorten
from agent.model import (
    IommuGroup,
    NetdevInfo,
    PciDevice,
    PfInfo,
    RdmaDevice,
    RdmaPort,
    VfInfo,
    is_pci_address,
)

# A sysfs attribute is at most one page; Linux prints into a PAGE_SIZE buffer.
MAX_ATTR_BYTES = 4096
# Errors with which the kernel says "no value now" (carrier of a down link, counters of an unbound
# driver): the attribute reads as absent.
_NO_VALUE = (errno.EINVAL, errno.ENODEV, errno.EOPNOTSUPP, errno.ENXIO, errno.ENOTDIR, errno.ENOENT)


class SysfsWriter(Protocol):
    """Where sysfs writes go. The real one writes files; the simulator emulates the kernel."""

    def write(self, path: Path, value: str) -> None: ...


class FileWriter:
    """Writes a value to a sysfs attribute exactly as `echo value > path` does."""

    def write(self, path: Path, value: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as e:
            raise SysfsError(str(path), e.errno or errno.EIO, op="write") from e
        try:
            os.write(fd, value.encode())
        except OSError as e:
            raise SysfsError(str(path), e.errno or errno.EIO, op=f"write {value.strip()!r} to") from e
        finally:
            os.close(fd)


class SysfsHost:
    """A read view of /sys (and /dev) below ``root``; ``root`` is "/" in production."""

    def __init__(self, root: str | Path = "/", dev_root: str | Path | None = None,
                 writer: SysfsWriter | None = None) -> None:
        self.root = Path(root)
        self.sys = self.root / "sys"
        self.dev = Path(dev_root) / "dev" if dev_root is not None else self.root / "dev"
        self.writer: SysfsWriter = writer or FileWriter()

    # ------------------------------------------------------------ paths
    def pci_dir(self, address: str) -> Path:
        return self.sys / "bus/pci/devices" / address

    def write(self, path: Path, value: str) -> None:
        self.writer.write(path, value)

    # ------------------------------------------------------------ listing
    def list_pci(self) -> list[PciDevice]:
        base = self.sys / "bus/pci/devices"
        out = []
        try:
            names = sorted(os.listdir(base))
        except FileNotFoundError:
            return []
        for name in names:
            d = base / name
            physfn = _link_name(d / "physfn")
            try:
                vendor = _hexid(_read_opt(d / "vendor"))
                device = _hexid(_read_opt(d / "device"))
                nets = tuple(_listdir(d / "net"))
            except SysfsError as e:
                out.append(PciDevice(name, "", "", physfn, error=str(e)))
                continue
            out.append(PciDevice(name, vendor, device, physfn, nets))
        return out

    def netdev_pci_address(self, ifname: str) -> str | None:
        """Which PCI function owns a netdev (None if it has none, or does not exist here)."""
        owner = _link_name(self.sys / "class/net" / ifname / "device")
        return owner if owner and is_pci_address(owner) else None

    # ------------------------------------------------------------ devices
    def read_pf(self, address: str, with_vfs: bool = True) -> PfInfo:
        d = self.pci_dir(address)
        if not d.exists():
            raise SysfsError(str(d), errno.ENOENT)
        # The VF count decides what a reconcile writes: a value that is not a number is never guessed.
        total = _count_opt(d / "sriov_totalvfs")
        numvfs = _count_opt(d / "sriov_numvfs")
        autoprobe = _read_opt(d / "sriov_drivers_autoprobe")
        netdev = self._first_netdev(d)
        vfs: tuple[VfInfo, ...] = ()
        if with_vfs:
            vfs = tuple(self._vf_or_error(a, i, address) for i, a in self.vf_links(address))
        return PfInfo(
            pci_address=address,
            vendor=_hexid(_read_opt(d / "vendor")),
            device=_hexid(_read_opt(d / "device")),
            driver=_link_name(d / "driver"),
            netdev=netdev,
            numa_node=_int_or(_read_opt(d / "numa_node"), -1),
            sriov_totalvfs=total,
            sriov_numvfs=numvfs or 0,
            vfs=vfs,
            rdma=self._first_rdma(d),
            sriov_drivers_autoprobe=None if autoprobe is None else autoprobe == "1",
        )

    def vf_links(self, pf_address: str) -> list[tuple[int, str]]:
        """(index, VF address) from the PF's virtfnN links, in index order."""
        d = self.pci_dir(pf_address)
        out = []
        for name in _listdir(d):
            if name.startswith("virtfn") and _is_number(name[6:]):
                target = _link_name(d / name)
                if target:
                    out.append((int(name[6:]), target))
        return sorted(out)

    def driver_of(self, address: str) -> str | None:
        """The driver bound to a PCI function (None: unbound)."""
        return _link_name(self.pci_dir(address) / "driver")

    def children(self, address: str, kind: str) -> list[str]:
        """Names under <pci>/<kind>/ ("net": netdevs, "infiniband": RDMA devices), sorted."""
        return _listdir(self.pci_dir(address) / kind)

    def netdev_mtu(self, address: str, ifname: str) -> int | None:
        mtu = _read_opt(self.pci_dir(address) / "net" / ifname / "mtu")
        return int(mtu) if mtu is not None and _is_number(mtu) else None

    def _vf_or_error(self, address: str, index: int, pf_address: str) -> VfInfo:
        """One VF whose files cannot be read must not hide its siblings: it is kept, marked."""
        try:
            return self.read_vf(address, index, pf_address)
        except SysfsError as e:
            return VfInfo(pci_address=address, index=index, pf_pci_address=pf_address, error=str(e))

    def read_vf(self, address: str, index: int, pf_address: str) -> VfInfo:
        d = self.pci_dir(address)
        return VfInfo(
            pci_address=address,
            index=index,
            pf_pci_address=pf_address,
            vendor=_hexid(_read_opt(d / "vendor")),
            device=_hexid(_read_opt(d / "device")),
            driver=_link_name(d / "driver"),
            netdev=self._first_netdev(d),
            rdma=self._first_rdma(d),
            numa_node=_int_or(_read_opt(d / "numa_node"), -1),
            iommu_group=self._iommu_group(d),
        )

    def read_netdev(self, ifname: str) -> NetdevInfo | None:
        return self._netdev(self.sys / "class/net" / ifname, ifname)

    def read_rdma(self, name: str) -> RdmaDevice | None:
        d = self.sys / "class/infiniband" / name
        if not d.exists():
            return None
        return self._rdma(d, name)

    def read_port_counters(self, rdma: str, port: int, group: str) -> dict[str, int]:
        """Integer files of ports/<port>/<group> ("counters" or "hw_counters") of an RDMA device.

        Files the kernel refuses or that hold no integer ("N/A (no PMA)") are left out, as
        node_exporter does; a missing or unreadable group gives an empty dict.
        """
        d = self.sys / "class/infiniband" / rdma / "ports" / str(port) / group
        try:
            return _int_files(d, _listdir(d))
        except SysfsError:
            return {}

    def read_netdev_stats(self, ifname: str, names: tuple[str, ...]) -> dict[str, int]:
        """The named files of /sys/class/net/<ifname>/statistics (empty when the netdev is not here)."""
        return _int_files(self.sys / "class/net" / ifname / "statistics", names)

    def gid_types(self, rdma: str, port: int = 1) -> list[str]:
        """ports/<port>/gid_attrs/types of an RDMA device, populated entries only ("RoCE v2", ...):
        an empty GID slot refuses the read (EINVAL), which _read_opt turns into None."""
        d = self.sys / "class/infiniband" / rdma / "ports" / str(port) / "gid_attrs/types"
        names = sorted(_listdir(d), key=lambda n: int(n) if n.isdigit() else -1)
        return [t for t in (_read_opt(d / n) for n in names) if t]

    def iommu_group(self, address: str) -> str | None:
        """The IOMMU group number of a PCI function (None: no IOMMU translates for it)."""
        return _link_name(self.pci_dir(address) / "iommu_group")

    def iommu_groups(self) -> list[str]:
        return _listdir(self.sys / "kernel/iommu_groups")

    def iommus(self) -> list[str]:
        """Registered IOMMU units (dmar0, smmu3.0x..., ivhd0): /sys/class/iommu."""
        return _listdir(self.sys / "class/iommu")

    def module_state(self, name: str, builtin_marker: str = "") -> str | None:
        """"module" when sys/module/<name> is a loaded module, "builtin" when it is compiled in (its
        sysfs directory without initstate, or ``builtin_marker`` -- a path below sys/ that only exists
        once the code is running, such as class/infiniband_verbs), None when not loaded."""
        d = self.sys / "module" / name
        if (d / "initstate").exists():
            return "module" if _read_opt(d / "initstate") in ("live", "coming") else None
        if d.is_dir() or (builtin_marker and (self.sys / builtin_marker).exists()):
            return "builtin"
        return None

    def module_param(self, module: str, param: str) -> str | None:
        return _read_opt(self.sys / "module" / module / "parameters" / param)

    def dev_path_exists(self, dev_path: str) -> bool:
        """Is /dev/<...> present on the host (checked under --dev-root)? On the Allocate path: one
        stat, no Path objects."""
        return os.path.exists(f"{self.dev}/{dev_path.removeprefix('/dev/')}")

    # ------------------------------------------------------------ helpers
    def _iommu_group(self, d: Path) -> IommuGroup | None:
        """The function's group: the ``iommu_group`` link's target, and its ``name`` (only groups
        vfio made up in no-IOMMU mode have one, "vfio-noiommu")."""
        number = _link_name(d / "iommu_group")
        if number is None:
            return None
        return IommuGroup(number, _read_opt(d / "iommu_group" / "name") or "")

    def _first_netdev(self, d: Path) -> NetdevInfo | None:
        names = _listdir(d / "net")
        return self._netdev(d / "net" / names[0], names[0]) if names else None

    def _netdev(self, nd: Path, name: str) -> NetdevInfo | None:
        operstate = _read_opt(nd / "operstate")
        if operstate is None:
            return None
        carrier = _read_opt(nd / "carrier")  # EINVAL while admin-down
        speed = _int_or(_read_opt(nd / "speed"), -1)
        return NetdevInfo(
            name=name,
            operstate=operstate,
            carrier=None if carrier is None else carrier == "1",
            mtu=_int_or(_read_opt(nd / "mtu"), 0),
            ifindex=_int_or(_read_opt(nd / "ifindex"), 0),
            mac=_read_opt(nd / "address") or "",
            speed_mbps=speed if speed > 0 else None,
        )

    def _first_rdma(self, d: Path) -> RdmaDevice | None:
        names = _listdir(d / "infiniband")
        return self._rdma(d / "infiniband" / names[0], names[0]) if names else None

    def _rdma(self, ib: Path, name: str) -> RdmaDevice:
        ports = []
        for p in _listdir(ib / "ports"):
            if not _is_number(p):
                continue
            pd = ib / "ports" / p
            state, state_name = _numbered(_read_opt(pd / "state"))
            phys, phys_name = _numbered(_read_opt(pd / "phys_state"))
            ports.append(RdmaPort(
                number=int(p), state=state, state_name=state_name, phys_state=phys,
                phys_state_name=phys_name, link_layer=_read_opt(pd / "link_layer") or "",
                rate=_read_opt(pd / "rate") or "",
            ))
        # <rdma>/device links to the PCI function (the parent of infiniband_verbs/ and infiniband_mad/).
        pci_dir = ib / "device" if (ib / "device").is_dir() else ib.parent.parent
        uverbs = _char_devs_of(pci_dir / "infiniband_verbs", name)
        mads = _char_devs_of(pci_dir / "infiniband_mad", name)
        return RdmaDevice(
            name=name,
            ports=tuple(sorted(ports, key=lambda x: x.number)),
            uverbs=uverbs[0] if uverbs else self._uverbs_by_class(name),
            umad=tuple(m for m in mads if m.startswith("umad")),
            issm=tuple(m for m in mads if m.startswith("issm")),
            node_guid=_read_opt(ib / "node_guid") or "",
        )

    def _uverbs_by_class(self, name: str) -> str | None:
        base = self.sys / "class/infiniband_verbs"
        for n in _listdir(base):
            if _ibdev_of(base / n) == name:
                return n
        return None


def _char_devs_of(class_dir: Path, ibdev: str) -> list[str]:
    """Entries of <pci>/infiniband_verbs or infiniband_mad whose ibdev names the RDMA device."""
    return [n for n in _listdir(class_dir) if _ibdev_of(class_dir / n) == ibdev]


def _ibdev_of(char_dev: Path) -> str | None:
    """The RDMA device a uverbs/umad entry belongs to; an unreadable entry is some other device's
    problem (it names none we look for), not the reader's."""
    try:
        return _read_opt(char_dev / "ibdev")
    except SysfsError:
        return None


def _listdir(path: Path) -> list[str]:
    """Sorted names in a sysfs directory; none when it does not exist. A loop or an I/O error is
    a SysfsError: the device is there but cannot be read."""
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise SysfsError(str(path), e.errno or errno.EIO, op="list") from e


def _read_opt(path: Path) -> str | None:
    """Read a sysfs attribute (at most one page, stripped); None when it does not exist or the kernel
    refuses (EINVAL/ENODEV). Bytes no kernel prints there raise SysfsContentError."""
    try:
        # O_NONBLOCK: a FIFO planted where an attribute should be reads as empty instead of hanging.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in _NO_VALUE:
            return None
        raise SysfsError(str(path), e.errno or errno.EIO) from e
    try:
        data = os.read(fd, MAX_ATTR_BYTES + 1)
    except OSError as e:
        if e.errno in _NO_VALUE or e.errno == errno.EAGAIN:
            return None
        raise SysfsError(str(path), e.errno or errno.EIO) from e
    finally:
        os.close(fd)
    if len(data) > MAX_ATTR_BYTES:
        raise SysfsContentError(str(path), f"more than {MAX_ATTR_BYTES} bytes: no sysfs attribute holds that")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise SysfsContentError(str(path), f"not text (byte 0x{data[e.start]:02x} at offset {e.start})") \
            from None
    if not text.isprintable():
        raise SysfsContentError(str(path), f"not text: {shorten(text, 40, quote=True)}")
    return text


def _count_opt(path: Path) -> int | None:
    """A count the kernel prints as a decimal number (sriov_numvfs); None when the file is absent."""
    text = _read_opt(path)
    if text is None:
        return None
    if not _is_number(text):
        raise SysfsContentError(str(path), f"not a number: {shorten(text, 40, quote=True)}")
    return int(text)


def _is_number(text: str) -> bool:
    """ASCII digits only ("²".isdigit() is True, yet int() refuses it)."""
    return text.isascii() and text.isdigit()


def _int_files(d: Path, names: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Read small integer attributes with bare os calls relative to one open directory: metrics read
    ~1500 of these per scrape, and resolving the long sysfs path (and its symlinks) once is cheaper."""
    try:
        dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return {}  # the netdev or RDMA port is not here (moved into a pod, unbound)
    out = {}
    try:
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=dir_fd)
            except OSError:
                continue  # gone, EACCES, ...: one counter must not hide the others
            try:
                raw = os.read(fd, 64).strip()
            except OSError:
                continue  # EINVAL / EOPNOTSUPP from drivers that refuse this counter
            finally:
                os.close(fd)
            if raw.isdigit():
                out[name] = int(raw)
    finally:
        os.close(dir_fd)
    return out


def _link_name(path: Path) -> str | None:
    try:
        return os.readlink(path).rstrip("/").rsplit("/", 1)[-1]
    except (FileNotFoundError, OSError):
        return None


def _hexid(text: str | None) -> str:
    return (text or "").lower().removeprefix("0x")


def _int_or(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _numbered(text: str | None) -> tuple[int, str]:
    """"4: ACTIVE" -> (4, "ACTIVE")."""
    if not text:
        return 0, ""
    num, _, name = text.partition(":")
    return _int_or(num.strip(), 0), name.strip()
