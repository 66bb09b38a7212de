"""Reading (and writing) the host's sysfs under an injectable root.

Everything here is a thin translation of files into model values; OSErrors become SysfsError
with the path and errno. No decisions are made here: core/ decides.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Protocol

from agent.errors import SysfsError
from agent.model import NetdevInfo, PciDevice, PfInfo, RdmaDevice, RdmaPort, VfInfo, is_pci_address


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
            vendor = _hexid(_read_opt(d / "vendor"))
            device = _hexid(_read_opt(d / "device"))
            physfn = _link_name(d / "physfn")
            out.append(PciDevice(name, vendor, device, physfn, tuple(_listdir(d / "net"))))
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
        total_raw = _read_opt(d / "sriov_totalvfs")
        total = _int_or(total_raw, 0) if total_raw is not None else None
        numvfs_raw = _read_opt(d / "sriov_numvfs")
        autoprobe = _read_opt(d / "sriov_drivers_autoprobe")
        netdev = self._first_netdev(d)
        vfs: tuple[VfInfo, ...] = ()
        if with_vfs:
            vfs = tuple(self.read_vf(a, i, address) for i, a in self.vf_links(address))
        return PfInfo(
            pci_address=address,
            vendor=_hexid(_read_opt(d / "vendor")),
            device=_hexid(_read_opt(d / "device")),
            driver=_link_name(d / "driver"),
            netdev=netdev,
            numa_node=_int_or(_read_opt(d / "numa_node"), -1),
            sriov_totalvfs=total,
            sriov_numvfs=_int_or(numvfs_raw, 0),
            vfs=vfs,
            rdma=self._first_rdma(d),
            sriov_drivers_autoprobe=None if autoprobe is None else autoprobe == "1",
        )

    def vf_links(self, pf_address: str) -> list[tuple[int, str]]:
        """(index, VF address) from the PF's virtfnN links, in index order."""
        d = self.pci_dir(pf_address)
        out = []
        for name in _listdir(d):
            if name.startswith("virtfn") and name[6:].isdigit():
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
        return int(mtu) if mtu is not None and mtu.isdigit() else None

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
        node_exporter does; a missing group gives an empty dict.
        """
        d = self.sys / "class/infiniband" / rdma / "ports" / str(port) / group
        return _int_files(d, _listdir(d))

    def read_netdev_stats(self, ifname: str, names: tuple[str, ...]) -> dict[str, int]:
        """The named files of /sys/class/net/<ifname>/statistics (empty when the netdev is not here)."""
        return _int_files(self.sys / "class/net" / ifname / "statistics", names)

    def dev_path_exists(self, dev_path: str) -> bool:
        """Is /dev/<...> present on the host (checked under --dev-root)? On the Allocate path: one
        stat, no Path objects."""
        return os.path.exists(f"{self.dev}/{dev_path.removeprefix('/dev/')}")

    # ------------------------------------------------------------ helpers
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
            if not p.isdigit():
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
            if _read_opt(base / n / "ibdev") == name:
                return n
        return None


def _char_devs_of(class_dir: Path, ibdev: str) -> list[str]:
    """Entries of <pci>/infiniband_verbs or infiniband_mad whose ibdev names the RDMA device."""
    return [n for n in _listdir(class_dir) if _read_opt(class_dir / n / "ibdev") == ibdev]


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_opt(path: Path) -> str | None:
    """Read a sysfs attribute; None when it does not exist or the kernel refuses (EINVAL/ENODEV)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENODEV, errno.EOPNOTSUPP, errno.ENXIO, errno.ENOTDIR):
            return None
        raise SysfsError(str(path), e.errno or errno.EIO) from e


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
                fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
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
