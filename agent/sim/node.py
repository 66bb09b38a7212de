"""A simulated node: a sysfs + /dev tree laid out as a real mlx5 (ConnectX-7) host shows it.

Used by `sriov-rdma-agent demo` and by the tests. The layout follows the kernel:
PCI devices live under sys/devices/pciDDDD:00/DDDD:00:00.0/<bdf>/ and every other view
(sys/bus/pci/devices, sys/class/net, sys/class/infiniband, sys/class/infiniband_verbs) is a
relative symlink into that tree, exactly as on a DGX Spark. VF routing IDs follow the PF's
sriov_offset/sriov_stride, as the PCIe SR-IOV capability defines them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

MLX_VENDOR = "15b3"
CX7_PF_DEVICE = "1021"
MLX5_VF_DEVICE = "101e"
MLX5_DRIVER = "mlx5_core"
CX7_SUBSYSTEM_DEVICE = "0023"
ETHERNET_CLASS = 0x020000  # PCI class: network controller, Ethernet
# ibv char device majors/minors as the kernel allocates them (uverbs: 231:192+N, umad: 231:N, issm: 231:64+N)
_UVERBS_MINOR_BASE = 192

PORT_STATES = {1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE", 5: "ACTIVE_DEFER"}
PHYS_STATES = {1: "Sleep", 2: "Polling", 3: "Disabled", 4: "PortConfigurationTraining", 5: "LinkUp"}

# IB PMA counters (ports/N/counters) and a representative subset of mlx5 hw_counters.
IB_COUNTERS = (
    "excessive_buffer_overrun_errors", "link_downed", "link_error_recovery", "local_link_integrity_errors",
    "multicast_rcv_packets", "multicast_xmit_packets", "port_rcv_constraint_errors", "port_rcv_data",
    "port_rcv_discards", "port_rcv_errors", "port_rcv_packets", "port_rcv_remote_physical_errors",
    "port_rcv_switch_relay_errors", "port_xmit_constraint_errors", "port_xmit_data", "port_xmit_discards",
    "port_xmit_packets", "port_xmit_wait", "symbol_error", "unicast_rcv_packets", "unicast_xmit_packets",
    "VL15_dropped",
)
MLX5_HW_COUNTERS = (
    "rx_write_requests", "rx_read_requests", "rx_atomic_requests", "rx_dct_connect", "out_of_buffer",
    "out_of_sequence", "duplicate_request", "rnr_nak_retry_err", "packet_seq_err", "implied_nak_seq_err",
    "local_ack_timeout_err", "resp_local_length_error", "resp_cqe_error", "req_cqe_error",
    "req_remote_invalid_request", "req_remote_access_errors", "resp_remote_access_errors",
    "resp_cqe_flush_error", "req_cqe_flush_error", "roce_adp_retrans", "roce_adp_retrans_to",
    "roce_slow_restart", "roce_slow_restart_cnps", "roce_slow_restart_trans", "rp_cnp_ignored",
    "rp_cnp_handled", "np_ecn_marked_roce_packets", "np_cnp_sent", "rx_icrc_encapsulated", "lifespan",
)
NETDEV_STATS = (
    "rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_dropped", "tx_dropped", "rx_errors", "tx_errors",
)


def bdf(domain: int, rid: int) -> str:
    """PCI routing ID (bus<<8 | dev<<3 | fn) -> "dddd:bb:dd.f"."""
    return f"{domain:04x}:{(rid >> 8) & 0xFF:02x}:{(rid >> 3) & 0x1F:02x}.{rid & 0x7}"


def rid_of(address: str) -> tuple[int, int]:
    dom, bus, devfn = address.split(":")
    dev, fn = devfn.split(".")
    return int(dom, 16), (int(bus, 16) << 8) | (int(dev, 16) << 3) | int(fn)


@dataclass
class SimPf:
    """One simulated physical function (one port of a ConnectX-7)."""

    pci_address: str
    netdev: str
    totalvfs: int = 8
    numvfs: int = 0
    numa_node: int = 0
    link_up: bool = True
    speed_mbps: int = 200000
    mtu: int = 1500
    sriov_offset: int = 2
    sriov_stride: int = 1
    driver: str | None = MLX5_DRIVER
    rdma: bool = True
    sriov: bool = True  # False: a NIC without the SR-IOV capability (no sriov_* files)
    vendor: str = MLX_VENDOR
    device: str = CX7_PF_DEVICE


@dataclass
class SimNode:
    """Builds and mutates a simulated sysfs tree under ``root`` (root/sys, root/dev)."""

    root: Path
    pfs: list[SimPf] = field(default_factory=list)
    _next_rdma: int = 0
    _next_ifindex: int = 2
    _rdma_of: dict[str, str] = field(default_factory=dict)  # pci address -> mlx5_N
    _uverbs_of: dict[str, int] = field(default_factory=dict)  # pci address -> N of uverbsN

    @property
    def sys(self) -> Path:
        return self.root / "sys"

    @property
    def dev(self) -> Path:
        return self.root / "dev"

    # ---------------------------------------------------------------- building
    def build(self) -> SimNode:
        (self.sys / "bus/pci/devices").mkdir(parents=True, exist_ok=True)
        for sub in ("net", "infiniband", "infiniband_verbs", "infiniband_mad"):
            (self.sys / "class" / sub).mkdir(parents=True, exist_ok=True)
        (self.dev / "infiniband").mkdir(parents=True, exist_ok=True)
        _write(self.dev / "infiniband/rdma_cm", "")
        _write(self.sys / "bus/pci/drivers_probe", "")
        _write(self.sys / "bus/pci/drivers_autoprobe", "1\n")
        for drv in (MLX5_DRIVER, "vfio-pci"):
            ddir = self.sys / "bus/pci/drivers" / drv
            ddir.mkdir(parents=True, exist_ok=True)
            for f in ("bind", "unbind", "new_id", "remove_id"):
                _write(ddir / f, "")
        for pf in self.pfs:
            self._add_pf(pf)
        for pf in self.pfs:
            if pf.numvfs:
                self.create_vfs(pf.pci_address, pf.numvfs)
        return self

    def device_dir(self, address: str) -> Path:
        domain = address.split(":", maxsplit=1)[0]
        return self.sys / "devices" / f"pci{domain}:00" / f"{domain}:00:00.0" / address

    def pf(self, address_or_name: str) -> SimPf:
        for pf in self.pfs:
            if address_or_name in (pf.pci_address, pf.netdev):
                return pf
        raise KeyError(address_or_name)

    def _add_pf(self, pf: SimPf) -> None:
        d = self._add_pci_function(pf.pci_address, pf.vendor, pf.device, pf.numa_node, pf.driver)
        if pf.sriov:
            _write(d / "sriov_totalvfs", f"{pf.totalvfs}\n")
            _write(d / "sriov_numvfs", "0\n")
            _write(d / "sriov_offset", f"{pf.sriov_offset}\n")
            _write(d / "sriov_stride", f"{pf.sriov_stride}\n")
            _write(d / "sriov_vf_device", f"{MLX5_VF_DEVICE}\n")
            _write(d / "sriov_drivers_autoprobe", "1\n")
        if pf.driver:
            self._add_netdev(pf.pci_address, pf.netdev, pf.link_up, pf.speed_mbps, pf.mtu)
            if pf.rdma:
                self._add_rdma(pf.pci_address, pf.netdev, pf.link_up, pf.speed_mbps)

    def _add_pci_function(self, address: str, vendor: str, device: str, numa: int,
                          driver: str | None) -> Path:
        d = self.device_dir(address)
        d.mkdir(parents=True, exist_ok=True)
        _write(d / "vendor", f"0x{vendor}\n")
        _write(d / "device", f"0x{device}\n")
        _write(d / "class", f"0x{ETHERNET_CLASS:06x}\n")
        _write(d / "subsystem_vendor", f"0x{MLX_VENDOR}\n")
        _write(d / "subsystem_device", f"0x{CX7_SUBSYSTEM_DEVICE}\n")
        _write(d / "modalias", _modalias(vendor, device, MLX_VENDOR, CX7_SUBSYSTEM_DEVICE, ETHERNET_CLASS))
        _write(d / "numa_node", f"{numa}\n")
        _write(d / "driver_override", "(null)\n")
        _write(d / "reset", "")
        _symlink(self.sys / "bus/pci/devices" / address, d)
        if driver:
            self.bind(address, driver)
        return d

    def _add_netdev(self, address: str, name: str, up: bool, speed: int, mtu: int) -> None:
        nd = self.device_dir(address) / "net" / name
        nd.mkdir(parents=True, exist_ok=True)
        ifindex = self._next_ifindex
        self._next_ifindex += 1
        _write(nd / "ifindex", f"{ifindex}\n")
        _write(nd / "iflink", f"{ifindex}\n")
        _write(nd / "type", "1\n")
        _write(nd / "mtu", f"{mtu}\n")
        _write(nd / "address", _mac(address))
        _write(nd / "tx_queue_len", "1000\n")
        stats = nd / "statistics"
        stats.mkdir(exist_ok=True)
        for s in NETDEV_STATS:
            _write(stats / s, "0\n")
        os.symlink(f"../../../{address}", nd / "device")
        _symlink(self.sys / "class/net" / name, nd)
        self.set_link(name, up, speed=speed)

    def _add_rdma(self, address: str, netdev: str, up: bool, speed: int) -> str:
        name = f"mlx5_{self._next_rdma}"
        uverbs = self._next_rdma
        self._next_rdma += 1
        self._rdma_of[address] = name
        self._uverbs_of[address] = uverbs
        d = self.device_dir(address)
        ib = d / "infiniband" / name
        ib.mkdir(parents=True, exist_ok=True)
        _write(ib / "node_guid", _guid(address))
        _write(ib / "sys_image_guid", _guid(address))
        _write(ib / "fw_ver", "28.39.1002\n")
        _write(ib / "hca_type", "MT4129\n")
        _write(ib / "board_id", "NVD0000000033\n")
        _write(ib / "node_type", "1: CA\n")
        port = ib / "ports/1"
        (port / "gids").mkdir(parents=True, exist_ok=True)
        (port / "gid_attrs/types").mkdir(parents=True, exist_ok=True)
        (port / "gid_attrs/ndevs").mkdir(parents=True, exist_ok=True)
        _write(port / "link_layer", "Ethernet\n")
        _write(port / "lid", "0x0\n")
        for i, (gid, typ) in enumerate(_gids(address)):
            _write(port / "gids" / str(i), gid + "\n")
            _write(port / "gid_attrs/types" / str(i), typ + "\n")
            _write(port / "gid_attrs/ndevs" / str(i), netdev + "\n")
        (port / "counters").mkdir(exist_ok=True)
        for c in IB_COUNTERS:
            _write(port / "counters" / c, "0\n")
        (port / "hw_counters").mkdir(exist_ok=True)
        for c in MLX5_HW_COUNTERS:
            _write(port / "hw_counters" / c, "10\n" if c == "lifespan" else "0\n")
        os.symlink(f"../../../{address}", ib / "device")
        _symlink(self.sys / "class/infiniband" / name, ib)
        self.set_rdma_port(name, up, speed=speed)
        uv = d / "infiniband_verbs" / f"uverbs{uverbs}"
        uv.mkdir(parents=True, exist_ok=True)
        _write(uv / "ibdev", name + "\n")
        _write(uv / "abi_version", "1\n")
        _write(uv / "dev", f"231:{_UVERBS_MINOR_BASE + uverbs}\n")
        os.symlink(f"../../../{address}", uv / "device")
        _symlink(self.sys / "class/infiniband_verbs" / f"uverbs{uverbs}", uv)
        for kind, base in (("umad", 0), ("issm", 64)):
            md = d / "infiniband_mad" / f"{kind}{uverbs}"
            md.mkdir(parents=True, exist_ok=True)
            _write(md / "ibdev", name + "\n")
            _write(md / "port", "1\n")
            _write(md / "dev", f"231:{base + uverbs}\n")
            os.symlink(f"../../../{address}", md / "device")
            _symlink(self.sys / "class/infiniband_mad" / f"{kind}{uverbs}", md)
            _write(self.dev / "infiniband" / f"{kind}{uverbs}", "")
        _write(self.dev / "infiniband" / f"uverbs{uverbs}", "")
        return name

    # ---------------------------------------------------------------- VFs
    def vf_address(self, pf_address: str, index: int) -> str:
        pf = self.pf(pf_address)
        domain, rid = rid_of(pf.pci_address)
        return bdf(domain, rid + pf.sriov_offset + index * pf.sriov_stride)

    def vf_netdev_name(self, pf_address: str, index: int) -> str:
        pf = self.pf(pf_address)
        base = pf.netdev.removesuffix("np0").removesuffix("np1")
        return f"{base}v{index}"

    def create_vfs(self, pf_address: str, n: int, autoprobe: bool = True) -> list[str]:
        """Materialise n VFs as the PCI core does (virtfnN/physfn links, then the driver probe)."""
        pf = self.pf(pf_address)
        pfd = self.device_dir(pf.pci_address)
        created = []
        for i in range(n):
            addr = self.vf_address(pf.pci_address, i)
            vd = self._add_pci_function(addr, pf.vendor, MLX5_VF_DEVICE, pf.numa_node, None)
            os.symlink(f"../{pf.pci_address}", vd / "physfn")
            os.symlink(f"../{addr}", pfd / f"virtfn{i}")
            if autoprobe and pf.driver:
                self.probe_vf(addr)
            created.append(addr)
        _write(pfd / "sriov_numvfs", f"{n}\n")
        pf.numvfs = n
        return created

    def probe_vf(self, vf_address: str, driver: str = MLX5_DRIVER) -> None:
        """What binding mlx5_core to a VF makes appear: netdev and RDMA device."""
        pf = self.pf(self.pf_of(vf_address))
        index = self.vf_index(vf_address)
        self.bind(vf_address, driver)
        if driver == MLX5_DRIVER:
            name = self.vf_netdev_name(pf.pci_address, index)
            self._add_netdev(vf_address, name, pf.link_up, pf.speed_mbps, 1500)
            if pf.rdma:
                self._add_rdma(vf_address, name, pf.link_up, pf.speed_mbps)

    def remove_vfs(self, pf_address: str) -> None:
        pf = self.pf(pf_address)
        pfd = self.device_dir(pf.pci_address)
        for link in sorted(pfd.glob("virtfn*")):
            addr = os.readlink(link).rsplit("/", 1)[-1]
            self.unprobe(addr)
            _rmtree(self.device_dir(addr))
            (self.sys / "bus/pci/devices" / addr).unlink()
            link.unlink()
        _write(pfd / "sriov_numvfs", "0\n")
        pf.numvfs = 0

    def unprobe(self, address: str) -> None:
        """Driver unbind: the netdev and the RDMA device go away, the PCI function stays."""
        d = self.device_dir(address)
        for nd in list((d / "net").glob("*")) if (d / "net").exists() else []:
            _unlink_if_link(self.sys / "class/net" / nd.name)
        for ib in list((d / "infiniband").glob("*")) if (d / "infiniband").exists() else []:
            _unlink_if_link(self.sys / "class/infiniband" / ib.name)
        for uv in list((d / "infiniband_verbs").glob("*")) if (d / "infiniband_verbs").exists() else []:
            _unlink_if_link(self.sys / "class/infiniband_verbs" / uv.name)
            (self.dev / "infiniband" / uv.name).unlink(missing_ok=True)
        for md in list((d / "infiniband_mad").glob("*")) if (d / "infiniband_mad").exists() else []:
            _unlink_if_link(self.sys / "class/infiniband_mad" / md.name)
            (self.dev / "infiniband" / md.name).unlink(missing_ok=True)
        for sub in ("net", "infiniband", "infiniband_verbs", "infiniband_mad"):
            _rmtree(d / sub)
        drv = d / "driver"
        if drv.is_symlink():
            name = os.readlink(drv).rsplit("/", 1)[-1]
            _unlink_if_link(self.sys / "bus/pci/drivers" / name / address)
            drv.unlink()

    def bind(self, address: str, driver: str) -> None:
        d = self.device_dir(address)
        ddir = self.sys / "bus/pci/drivers" / driver
        ddir.mkdir(parents=True, exist_ok=True)
        _unlink_if_link(d / "driver")
        os.symlink(os.path.relpath(ddir, d), d / "driver")
        _symlink(ddir / address, d)

    def pf_of(self, vf_address: str) -> str:
        return os.readlink(self.device_dir(vf_address) / "physfn").rsplit("/", 1)[-1]

    def vf_index(self, vf_address: str) -> int:
        pfd = self.device_dir(self.pf_of(vf_address))
        for link in pfd.glob("virtfn*"):
            if os.readlink(link).endswith("/" + vf_address):
                return int(link.name.removeprefix("virtfn"))
        raise KeyError(vf_address)

    def rdma_name(self, address: str) -> str:
        return self._rdma_of[address]

    # ---------------------------------------------------------------- state changes
    def set_link(self, netdev: str, up: bool, speed: int | None = None) -> None:
        nd = self.sys / "class/net" / netdev
        if not nd.exists():
            nd = next(self.sys.glob(f"devices/*/*/*/net/{netdev}"))
        _write(nd / "operstate", "up\n" if up else "down\n")
        _write(nd / "carrier", "1\n" if up else "0\n")
        _write(nd / "speed", f"{speed if (up and speed) else -1}\n")

    def set_rdma_port(self, rdma: str, up: bool, speed: int | None = None) -> None:
        port = self.sys / "class/infiniband" / rdma / "ports/1"
        if not port.exists():
            port = next(self.sys.glob(f"devices/*/*/*/infiniband/{rdma}/ports/1"))
        state, phys = (4, 5) if up else (1, 3)
        _write(port / "state", f"{state}: {PORT_STATES[state]}\n")
        _write(port / "phys_state", f"{phys}: {PHYS_STATES[phys]}\n")
        gbps = (speed or 200000) // 1000
        _write(port / "rate", f"{gbps} Gb/sec (4X HDR)\n" if up else "10 Gb/sec (4X SDR)\n")

    def set_pf_link(self, pf_address_or_name: str, up: bool) -> None:
        """A cable pull on the PF: carrier and RDMA port state follow, as on mlx5."""
        pf = self.pf(pf_address_or_name)
        pf.link_up = up
        self.set_link(pf.netdev, up, pf.speed_mbps)
        if pf.pci_address in self._rdma_of:
            self.set_rdma_port(self._rdma_of[pf.pci_address], up, pf.speed_mbps)

    def move_netdev_to_pod(self, netdev: str) -> None:
        """sriov-cni moving a VF netdev into a pod netns: it vanishes from the host's sysfs."""
        link = self.sys / "class/net" / netdev
        target = link.resolve()
        link.unlink()
        _rmtree(target)


def dgx_spark(root: Path, numvfs: int = 4, totalvfs: int = 8) -> SimNode:
    """A DGX Spark's ConnectX-7: four PFs in two PCI domains; the 0002 port 0 carries the QSFP cable."""
    pfs = [
        SimPf("0000:01:00.0", "enp1s0f0np0", totalvfs=totalvfs, link_up=False),
        SimPf("0000:01:00.1", "enp1s0f1np1", totalvfs=totalvfs, link_up=False, sriov_offset=1 + totalvfs),
        SimPf("0002:01:00.0", "enP2p1s0f0np0", totalvfs=totalvfs, numvfs=numvfs),
        SimPf("0002:01:00.1", "enP2p1s0f1np1", totalvfs=totalvfs, link_up=False, sriov_offset=1 + totalvfs),
    ]
    return SimNode(root=root, pfs=pfs).build()


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _symlink(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    _unlink_if_link(link)
    os.symlink(os.path.relpath(target, link.parent), link)


def _unlink_if_link(path: Path) -> None:
    if path.is_symlink():
        path.unlink()


def _rmtree(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    for child in path.iterdir():
        _rmtree(child)
    path.rmdir()


def _modalias(vendor: str, device: str, sub_vendor: str, sub_device: str, pci_class: int) -> str:
    """drivers/pci/pci-sysfs.c modalias_show: what udev and ghw (the community plugin) parse."""
    return (f"pci:v{int(vendor, 16):08X}d{int(device, 16):08X}sv{int(sub_vendor, 16):08X}"
            f"sd{int(sub_device, 16):08X}bc{pci_class >> 16:02X}sc{(pci_class >> 8) & 0xFF:02X}"
            f"i{pci_class & 0xFF:02X}\n")


def _mac(address: str) -> str:
    dom, rid = rid_of(address)
    return f"b8:3f:d2:{dom & 0xFF:02x}:{(rid >> 8) & 0xFF:02x}:{rid & 0xFF:02x}\n"


def _guid(address: str) -> str:
    dom, rid = rid_of(address)
    return f"b83f:d203:00{dom & 0xFF:02x}:{rid:04x}\n"


def _gids(address: str) -> list[tuple[str, str]]:
    dom, rid = rid_of(address)
    link_local = f"fe80:0000:0000:0000:ba3f:d2ff:fe{dom & 0xFF:02x}:{rid:04x}"
    return [(link_local, "IB/RoCE v1"), (link_local, "RoCE v2")]
