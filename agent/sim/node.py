"""A simulated node: a sysfs + /dev tree laid out as a real mlx5 (ConnectX-7) host shows it.

Used by `sriov-rdma-agent demo` and by the tests. The layout follows the kernel:
PCI devices live under sys/devices/pciDDDD:00/DDDD:00:00.0/<bdf>/ and every other view
(sys/bus/pci/devices, sys/class/net, sys/class/infiniband, sys/class/infiniband_verbs) is a
relative symlink into that tree, exactly as on a DGX Spark. VF routing IDs follow the PF's
sriov_offset/sriov_stride, as the PCIe SR-IOV capability defines them.
"""

from __future__ import annotations

import errno
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

# What lsmod shows on a DGX Spark with the RDMA stack loaded (Talos machine.kernel.modules), and the
# driver each module registers on the PCI bus (sys/bus/pci/drivers/<driver>/module links back).
RDMA_MODULES = ("mlx5_core", "mlx5_ib", "ib_core", "ib_uverbs", "ib_umad", "ib_cm", "iw_cm", "rdma_cm",
                "rdma_ucm", "vfio_pci")
_MODULE_DRIVERS = {"mlx5_core": MLX5_DRIVER, "vfio_pci": "vfio-pci"}
VFIO_DRIVER = "vfio-pci"
VFIO_NOIOMMU_NAME = "vfio-noiommu"  # the name vfio gives the groups it makes up in no-IOMMU mode
_VFIO_MAJOR = 511  # dynamic char major the vfio group nodes get (misc 10:196 is /dev/vfio/vfio)
# The arm64 DGX Spark's SMMUv3 as /sys/class/iommu names it.
SIM_IOMMU = "smmu3.0x0000000016000000"

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
    vf_flr: bool = True  # VFs advertise FLR (PCIe DevCap), so the kernel gives them a sysfs `reset`
    vendor: str = MLX_VENDOR
    device: str = CX7_PF_DEVICE


@dataclass
class SimNode:
    """Builds and mutates a simulated sysfs tree under ``root`` (root/sys, root/dev)."""

    root: Path
    pfs: list[SimPf] = field(default_factory=list)
    modules: tuple[str, ...] = RDMA_MODULES  # loaded kernel modules (sys/module)
    netns_mode: str = "shared"  # ib_core netns_mode: "shared" (Y, the default) or "exclusive" (N)
    iommu: bool = True  # an IOMMU is on: every PCI function sits in an iommu group
    vfio_noiommu: bool = False  # vfio.enable_unsafe_noiommu_mode=1: vfio-pci makes up a group without one
    _next_rdma: int = 0
    _next_iommu_group: int = 0
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
        # A class directory exists once the module that registers it is loaded (ib_core: infiniband).
        classes = {"net": True, "infiniband": "ib_core" in self.modules,
                   "infiniband_verbs": "ib_uverbs" in self.modules,
                   "infiniband_mad": "ib_umad" in self.modules}
        for sub, present in classes.items():
            if present:
                (self.sys / "class" / sub).mkdir(parents=True, exist_ok=True)
        (self.dev / "infiniband").mkdir(parents=True, exist_ok=True)
        if "rdma_ucm" in self.modules:
            _write(self.dev / "infiniband/rdma_cm", "")
            misc = self.sys / "devices/virtual/misc/rdma_cm"
            misc.mkdir(parents=True, exist_ok=True)
            _write(misc / "dev", "10:58\n")
            _symlink(self.sys / "class/misc/rdma_cm", misc)
        if "vfio_pci" in self.modules:  # vfio's container node, /dev/vfio/vfio (misc 10:196)
            (self.dev / "vfio").mkdir(parents=True, exist_ok=True)
            _write(self.dev / "vfio/vfio", "")
            misc = self.sys / "devices/virtual/misc/vfio"
            misc.mkdir(parents=True, exist_ok=True)
            _write(misc / "dev", "10:196\n")
            _symlink(self.sys / "class/misc/vfio", misc)
        _write(self.sys / "bus/pci/drivers_probe", "")
        _write(self.sys / "bus/pci/drivers_autoprobe", "1\n")
        for drv in (d for m, d in _MODULE_DRIVERS.items() if m in self.modules):
            ddir = self.sys / "bus/pci/drivers" / drv
            ddir.mkdir(parents=True, exist_ok=True)
            for f in ("bind", "unbind", "new_id", "remove_id"):
                _write(ddir / f, "")
        for mod in self.modules:
            self._add_module(mod)
        if self.iommu:
            (self.sys / "kernel/iommu_groups").mkdir(parents=True, exist_ok=True)
            iommu = self.sys / "devices/virtual/iommu" / SIM_IOMMU
            iommu.mkdir(parents=True, exist_ok=True)
            _symlink(self.sys / "class/iommu" / SIM_IOMMU, iommu)
        for pf in self.pfs:
            self._add_pf(pf)
        for pf in self.pfs:
            if pf.numvfs:
                self.create_vfs(pf.pci_address, pf.numvfs)
        return self

    def _add_module(self, name: str) -> None:
        """sys/module/<name> as a loaded module shows it; ib_core carries the netns_mode parameter."""
        d = self.sys / "module" / name
        (d / "holders").mkdir(parents=True, exist_ok=True)
        _write(d / "initstate", "live\n")
        _write(d / "refcnt", "0\n")
        if name == "ib_core":
            (d / "parameters").mkdir(exist_ok=True)
            _write(d / "parameters/netns_mode", "Y\n" if self.netns_mode == "shared" else "N\n")
        driver = _MODULE_DRIVERS.get(name)
        if driver is not None:
            ddir = self.sys / "bus/pci/drivers" / driver
            ddir.mkdir(parents=True, exist_ok=True)
            _symlink(ddir / "module", d)
            _symlink(d / "drivers" / f"pci:{driver}", ddir)

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
            if pf.rdma and "mlx5_ib" in self.modules:
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
        if self.iommu:
            group = self._add_iommu_group(address)
            _write(group / "type", "DMA\n")
            _symlink(d / "iommu", self.sys / "devices/virtual/iommu" / SIM_IOMMU)
        if driver:
            self.bind(address, driver)
        return d

    def _add_iommu_group(self, address: str) -> Path:
        """iommu_group_alloc + iommu_group_add_device: the next group number, the device in it."""
        group = self.sys / "kernel/iommu_groups" / str(self._next_iommu_group)
        self._next_iommu_group += 1
        (group / "devices").mkdir(parents=True, exist_ok=True)
        d = self.device_dir(address)
        _symlink(group / "devices" / address, d)
        _symlink(d / "iommu_group", group)
        return group

    def _vfio_attach(self, address: str) -> None:
        """vfio_pci_probe: the device's IOMMU group gets its /dev/vfio node. With no group, vfio's
        no-IOMMU mode makes one up (named "vfio-noiommu", node /dev/vfio/noiommu-<n>); without that
        mode the probe fails with EINVAL and the device stays unbound."""
        link = self.device_dir(address) / "iommu_group"
        if link.is_symlink():
            group, node = link.resolve(), link.resolve().name
        elif self.vfio_noiommu:
            group = self._add_iommu_group(address)
            _write(group / "name", VFIO_NOIOMMU_NAME + "\n")
            node = f"noiommu-{group.name}"
        else:
            raise OSError(errno.EINVAL, f"vfio-pci {address}: no iommu_group found")
        (self.dev / "vfio").mkdir(parents=True, exist_ok=True)
        _write(self.dev / "vfio" / node, "")
        vd = self.sys / "devices/virtual/vfio" / node
        vd.mkdir(parents=True, exist_ok=True)
        _write(vd / "dev", f"{_VFIO_MAJOR}:{group.name}\n")
        _symlink(self.sys / "class/vfio" / node, vd)

    def _vfio_detach(self, address: str) -> None:
        """vfio-pci released: the group's node goes once no device of the group is bound to vfio-pci;
        a group vfio made up (no-IOMMU) goes with it."""
        link = self.device_dir(address) / "iommu_group"
        if not link.is_symlink():
            return
        group = link.resolve()
        for member in (group / "devices").iterdir():
            drv = member / "driver"
            if member.name != address and drv.is_symlink() and os.readlink(drv).endswith("/" + VFIO_DRIVER):
                return
        noiommu = _read_text(group / "name") == VFIO_NOIOMMU_NAME
        node = f"noiommu-{group.name}" if noiommu else group.name
        (self.dev / "vfio" / node).unlink(missing_ok=True)
        _unlink_if_link(self.sys / "class/vfio" / node)
        _rmtree(self.sys / "devices/virtual/vfio" / node)
        if noiommu:
            link.unlink()
            _rmtree(group)

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
        if "ib_uverbs" in self.modules:
            self._add_char_devs(d, address, name, uverbs)
        return name

    def _add_char_devs(self, d: Path, address: str, name: str, uverbs: int) -> None:
        """uverbsN (ib_uverbs) and umadN/issmN (ib_umad), in sysfs and under dev/infiniband."""
        uv = d / "infiniband_verbs" / f"uverbs{uverbs}"
        uv.mkdir(parents=True, exist_ok=True)
        _write(uv / "ibdev", name + "\n")
        _write(uv / "abi_version", "1\n")
        _write(uv / "dev", f"231:{_UVERBS_MINOR_BASE + uverbs}\n")
        os.symlink(f"../../../{address}", uv / "device")
        _symlink(self.sys / "class/infiniband_verbs" / f"uverbs{uverbs}", uv)
        for kind, base in (("umad", 0), ("issm", 64)) if "ib_umad" in self.modules else ():
            md = d / "infiniband_mad" / f"{kind}{uverbs}"
            md.mkdir(parents=True, exist_ok=True)
            _write(md / "ibdev", name + "\n")
            _write(md / "port", "1\n")
            _write(md / "dev", f"231:{base + uverbs}\n")
            os.symlink(f"../../../{address}", md / "device")
            _symlink(self.sys / "class/infiniband_mad" / f"{kind}{uverbs}", md)
            _write(self.dev / "infiniband" / f"{kind}{uverbs}", "")
        _write(self.dev / "infiniband" / f"uverbs{uverbs}", "")

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
            if not pf.vf_flr:  # no reset method: pci_dev_reset_attr_is_visible hides the attribute
                (vd / "reset").unlink()
            os.symlink(f"../{pf.pci_address}", vd / "physfn")
            os.symlink(f"../{addr}", pfd / f"virtfn{i}")
            if autoprobe and pf.driver:
                self.probe_vf(addr)
            created.append(addr)
        _write(pfd / "sriov_numvfs", f"{n}\n")
        pf.numvfs = n
        return created

    def probe_vf(self, vf_address: str, driver: str = MLX5_DRIVER) -> None:
        """What binding a driver to a VF makes appear: mlx5_core its netdev and RDMA device, vfio-pci
        its group's /dev/vfio node (OSError EINVAL when it has no group to use)."""
        pf = self.pf(self.pf_of(vf_address))
        index = self.vf_index(vf_address)
        if driver == VFIO_DRIVER:
            self._vfio_attach(vf_address)
        self.bind(vf_address, driver)
        if driver == MLX5_DRIVER:
            name = self.vf_netdev_name(pf.pci_address, index)
            self._add_netdev(vf_address, name, pf.link_up, pf.speed_mbps, 1500)
            if pf.rdma and "mlx5_ib" in self.modules:
                self._add_rdma(vf_address, name, pf.link_up, pf.speed_mbps)

    def remove_vfs(self, pf_address: str) -> None:
        pf = self.pf(pf_address)
        pfd = self.device_dir(pf.pci_address)
        for link in sorted(pfd.glob("virtfn*")):
            addr = os.readlink(link).rsplit("/", 1)[-1]
            self.unprobe(addr)
            group = self.device_dir(addr) / "iommu_group"
            if group.is_symlink():
                _rmtree(group.resolve())
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
            if name == VFIO_DRIVER:
                self._vfio_detach(address)
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

    def move_netdev_home(self, vf_address: str, mtu: int = 1500) -> str:
        """sriov-cni DEL: the VF netdev back in the host netns under its own name (at the MTU the pod
        left it, unless sriov-cni restored it); the kernel sends RTM_NEWLINK. Returns the name."""
        pf = self.pf(self.pf_of(vf_address))
        name = self.vf_netdev_name(pf.pci_address, self.vf_index(vf_address))
        self._add_netdev(vf_address, name, pf.link_up, pf.speed_mbps, mtu)
        return name


def dgx_spark(root: Path, numvfs: int = 4, totalvfs: int = 8, *, iommu: bool = True,
              vfio_noiommu: bool = False) -> SimNode:
    """A DGX Spark's ConnectX-7: four PFs in two PCI domains; the 0002 port 0 carries the QSFP cable.
    ``iommu`` off: no IOMMU groups (vfio-pci then needs ``vfio_noiommu``, vfio's no-IOMMU mode)."""
    pfs = [
        SimPf("0000:01:00.0", "enp1s0f0np0", totalvfs=totalvfs, link_up=False),
        SimPf("0000:01:00.1", "enp1s0f1np1", totalvfs=totalvfs, link_up=False, sriov_offset=1 + totalvfs),
        SimPf("0002:01:00.0", "enP2p1s0f0np0", totalvfs=totalvfs, numvfs=numvfs),
        SimPf("0002:01:00.1", "enP2p1s0f1np1", totalvfs=totalvfs, link_up=False, sriov_offset=1 + totalvfs),
    ]
    return SimNode(root=root, pfs=pfs, iommu=iommu, vfio_noiommu=vfio_noiommu).build()


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


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
