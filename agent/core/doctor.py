"""`sriov-rdma-agent doctor`: what is wrong with this node for RDMA pods, and how to fix it on Talos.

Pure: every check is a function from a plain-data snapshot of the node (NodeFacts, gathered by
agent/doctor.py) to Check results. Nothing here reads a file or opens a socket, so each check is
tested by handing it facts, and the snapshot can come from any source that fills it.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from agent.config import Config, PfConfig, ResourceConfig
from agent.core.inventory import devinfo_file_name
from agent.model import IB_PORT_ACTIVE, PfInfo

MLX_VENDOR = "15b3"


class Status(enum.Enum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"  # not applicable here, or could not be asked (said why)


@dataclass(frozen=True)
class Check:
    area: str  # "SR-IOV", "IOMMU", "Modules", "RDMA", "Link", "Kubernetes", "Talos"
    name: str
    status: Status
    evidence: str
    remedy: str = ""
    talos: str = ""  # a Talos machine-config snippet (YAML) when the fix is a kernel argument or module
    note: str = ""  # background the reader needs to act on the result (shown for every status)

    def as_dict(self) -> dict[str, str]:
        return {
            "area": self.area,
            "check": self.name,
            "status": self.status.value,
            "evidence": self.evidence,
            "remedy": self.remedy,
            "talos": self.talos,
            "note": self.note,
        }


# ---------------------------------------------------------------- the snapshot
@dataclass(frozen=True)
class PfFacts:
    """One configured PF that was found, with what the checks need beyond PfInfo."""

    resource: ResourceConfig
    config: PfConfig
    info: PfInfo  # the PF and its VFs as sysfs shows them
    eswitch_mode: str | None = None
    eswitch_checked: bool = False  # False: devlink was not asked (not the real host)
    gid_types: tuple[str, ...] = ()  # the PF's populated ports/1/gid_attrs/types entries
    vf_iommu_groups: Mapping[str, str | None] = field(default_factory=dict)
    dev_nodes: Mapping[str, bool] = field(default_factory=dict)  # "/dev/infiniband/uverbsN" -> exists


@dataclass(frozen=True)
class NetnsFacts:
    mode: str | None  # "shared" / "exclusive"; None when it could not be read
    source: str  # where it was read from, or why not
    cross_check: str | None = None  # the ib_core module parameter, when it disagrees with netlink


@dataclass(frozen=True)
class AgentFacts:
    """The running agent, as its health endpoint answers."""

    address: str  # "" when --health-address is off
    reachable: bool = False
    error: str = ""
    deviceplugin_serving: bool | None = None
    reason: str = ""  # why deviceplugin is NOT_SERVING (from the status document)
    registered: Mapping[str, bool] = field(default_factory=dict)
    advertised: Mapping[str, tuple[str, ...]] | None = None  # resource -> device IDs; None: not asked
    allocated: frozenset[str] = frozenset()


@dataclass(frozen=True)
class KubeFacts:
    device_plugin_dir: str
    kubelet_socket: str
    kubelet_socket_state: str  # "socket", "missing", "not a socket"
    devinfo_dir: str
    devinfo_writable: bool
    devinfo_error: str
    pod_resources_socket: str
    pod_resources_error: str  # "" when List answered
    pod_devices: int  # devices of any resource PodResources says pods hold
    devinfo_files: Mapping[str, str]  # file name -> content (only ours: <resource>-...-device.json)


@dataclass(frozen=True)
class TalosFacts:
    real_root: bool  # --sysfs-root is the host's own sysfs
    etc_path: str
    etc_read_only: bool | None  # None: not checked (simulated root, or host /etc not visible)
    kernel_release: str | None
    write_paths: Mapping[str, str]  # flag -> path the agent writes


@dataclass(frozen=True)
class NodeFacts:
    config: Config
    sysfs_root: str
    dev_root: str
    real_root: bool
    pf_problems: tuple[str, ...]  # configured PFs not found (or unreadable), one sentence each
    pfs: tuple[PfFacts, ...]
    modules: Mapping[str, str | None] | None  # name -> "module"/"builtin"/None; None: no sys/module to read
    iommus: tuple[str, ...]
    iommu_groups: int
    netns: NetnsFacts
    agent: AgentFacts
    kube: KubeFacts
    talos: TalosFacts


# ---------------------------------------------------------------- Talos snippets
def talos_modules(*names: str) -> str:
    items = "".join(f"      - name: {n}\n" for n in names)
    return f"machine:\n  kernel:\n    modules:\n{items}"


def talos_kernel_args(*args: str) -> str:
    items = "".join(f"      - {a}\n" for a in args)
    return f"machine:\n  install:\n    extraKernelArgs:\n{items}"


UKI_NOTE = (
    "then upgrade/reboot the node; on systemd-boot (UKI) installs extraKernelArgs is ignored: "
    "bake the argument into the image with Image Factory"
)
REBOOT = "talosctl -n <node> reboot"


def _pf_name(pf: PfInfo) -> str:
    return f"{pf.pci_address} ({pf.netdev.name})" if pf.netdev else pf.pci_address


# ---------------------------------------------------------------- SR-IOV
def check_sriov(f: NodeFacts) -> list[Check]:
    out: list[Check] = []
    a = "SR-IOV"
    for problem in f.pf_problems:
        out.append(
            Check(
                a,
                "PF present",
                Status.FAIL,
                problem,
                "fix the selector in the config (pfName / pciAddress / vendor+device) or the node: "
                "`talosctl -n <node> get links` lists interfaces, "
                "`talosctl -n <node> ls /sys/bus/pci/devices` PCI functions",
            )
        )
    for p in f.pfs:
        pf, cfg = p.info, p.config
        where = f"{p.resource.resource_name} {cfg.selector.describe()}"
        if pf.driver is None:
            out.append(
                Check(
                    a,
                    "PF present",
                    Status.FAIL,
                    f"{where} -> {pf.pci_address}: no driver is bound",
                    "load the NIC driver (mlx5_core) so the PF can create VFs",
                    talos_modules("mlx5_core") if pf.vendor == MLX_VENDOR else "",
                )
            )
        else:
            out.append(Check(a, "PF present", Status.PASS, f"{where} -> {_pf_name(pf)}, driver {pf.driver}"))
        out.append(_totalvfs(p))
        out.append(_numvfs(p))
        out.append(_vf_driver(p))
        out.append(_eswitch(p))
    return out


def _mstconfig(pf: PfInfo, n: int) -> str:
    return (
        f"enable SR-IOV in the NIC firmware from a privileged debug pod on the node: "
        f"`mstconfig -d {pf.pci_address} -y set SRIOV_EN=1 NUM_OF_VFS={n}`, then reboot ({REBOOT}); "
        f'the new value shows in the "Next boot" column until then (docs/install-talos.md#firmware)'
    )


def _totalvfs(p: PfFacts) -> Check:
    pf, want = p.info, p.config.num_vfs or 0
    if not pf.sriov_totalvfs:
        what = (
            "no SR-IOV capability (no sriov_totalvfs)" if pf.sriov_totalvfs is None else "sriov_totalvfs = 0"
        )
        return Check(
            "SR-IOV",
            "firmware SR-IOV",
            Status.FAIL,
            f"{_pf_name(pf)}: {what}: firmware SR-IOV is off",
            _mstconfig(pf, max(want, 8)),
        )
    return Check(
        "SR-IOV", "firmware SR-IOV", Status.PASS, f"{_pf_name(pf)}: sriov_totalvfs = {pf.sriov_totalvfs}"
    )


def _numvfs(p: PfFacts) -> Check:
    pf, cfg = p.info, p.config
    total = pf.sriov_totalvfs or 0
    if cfg.num_vfs is None:
        return Check(
            "SR-IOV",
            "numVfs",
            Status.PASS,
            f"{_pf_name(pf)}: externally managed, {pf.sriov_numvfs} VFs of {total}",
        )
    if cfg.num_vfs > total:
        return Check(
            "SR-IOV",
            "numVfs",
            Status.FAIL,
            f"{_pf_name(pf)}: numVfs {cfg.num_vfs} > sriov_totalvfs {total} (the kernel answers ERANGE)",
            f"lower numVfs to {total}, or {_mstconfig(pf, cfg.num_vfs)}",
        )
    if pf.sriov_numvfs != cfg.num_vfs:
        how = (
            "externally managed: whoever owns this PF must create them"
            if cfg.externally_managed
            else "the agent has not reconciled it yet: is it running? `sriov-rdma-agent status` "
            "shows the last reconcile and why it stopped"
        )
        return Check(
            "SR-IOV",
            "numVfs",
            Status.WARN,
            f"{_pf_name(pf)}: sriov_numvfs = {pf.sriov_numvfs}, config wants {cfg.num_vfs}",
            how,
        )
    return Check(
        "SR-IOV", "numVfs", Status.PASS, f"{_pf_name(pf)}: {pf.sriov_numvfs} VFs, as configured (max {total})"
    )


def _vf_driver(p: PfFacts) -> Check:
    pf, cfg = p.info, p.config
    if not pf.vfs:
        return Check("SR-IOV", "VF driver", Status.SKIP, f"{_pf_name(pf)}: no VFs to check")
    want = cfg.vf_driver or pf.driver
    wrong = [f"{vf.pci_address} ({vf.driver or 'unbound'})" for vf in pf.vfs if vf.driver != want]
    if wrong:
        remedy = (
            f"bind them to {want}: `echo <vf> > /sys/bus/pci/drivers_probe` (the agent does this when "
            f"vfDriver is set); with driversAutoprobe: false and no vfDriver VFs stay unbound"
        )
        return Check(
            "SR-IOV",
            "VF driver",
            Status.FAIL,
            f"{_pf_name(pf)}: {len(wrong)} of {len(pf.vfs)} VFs not on {want}: {', '.join(wrong)}",
            remedy,
        )
    return Check("SR-IOV", "VF driver", Status.PASS, f"{_pf_name(pf)}: all {len(pf.vfs)} VFs bound to {want}")


def _eswitch(p: PfFacts) -> Check:
    pf = p.info
    if not p.eswitch_checked:
        return Check(
            "SR-IOV",
            "eswitch mode",
            Status.SKIP,
            f"{_pf_name(pf)}: not checked: devlink answers only on the real host",
        )
    if p.eswitch_mode is None:
        return Check(
            "SR-IOV",
            "eswitch mode",
            Status.SKIP,
            f"{_pf_name(pf)}: devlink reports no eswitch for pci/{pf.pci_address} (nothing to switch)",
        )
    if p.eswitch_mode != "legacy":
        return Check(
            "SR-IOV",
            "eswitch mode",
            Status.FAIL,
            f"{_pf_name(pf)}: eswitch mode is {p.eswitch_mode}; RDMA VFs with sriov-cni need legacy",
            f"`devlink dev eswitch set pci/{pf.pci_address} mode legacy` (with 0 VFs; the agent never "
            "changes the eswitch mode itself)",
        )
    return Check("SR-IOV", "eswitch mode", Status.PASS, f"{_pf_name(pf)}: eswitch mode legacy (devlink)")


# ---------------------------------------------------------------- IOMMU
def check_iommu(f: NodeFacts) -> list[Check]:
    vfio = [p for p in f.pfs if (p.config.vf_driver or "").startswith("vfio")]
    state = f"IOMMU units: {', '.join(f.iommus) or 'none'}; {f.iommu_groups} IOMMU groups"
    if not vfio:
        return [
            Check(
                "IOMMU",
                "IOMMU for vfio",
                Status.SKIP,
                f"no resource binds its VFs to vfio-pci, so none needs the IOMMU ({state})",
            )
        ]
    out = []
    for p in vfio:
        missing = [vf for vf, g in p.vf_iommu_groups.items() if g is None]
        if not f.iommu_groups or missing:
            what = (
                f"no IOMMU groups at all ({state})"
                if not f.iommu_groups
                else f"VFs without an IOMMU group: {', '.join(missing)}"
            )
            out.append(
                Check(
                    "IOMMU",
                    "IOMMU for vfio",
                    Status.FAIL,
                    f"{_pf_name(p.info)} binds VFs to {p.config.vf_driver}: {what}",
                    "turn the IOMMU on (firmware/BIOS VT-d, AMD-Vi or SMMU, and the kernel): " + UKI_NOTE,
                    talos_kernel_args("intel_iommu=on", "iommu=pt"),
                )
            )
        else:
            groups = sorted(
                {g for g in p.vf_iommu_groups.values() if g}, key=lambda g: int(g) if g.isdigit() else 0
            )
            out.append(
                Check(
                    "IOMMU",
                    "IOMMU for vfio",
                    Status.PASS,
                    f"{_pf_name(p.info)}: every VF in its own IOMMU group ({', '.join(groups)}); {state}",
                )
            )
    return out


# ---------------------------------------------------------------- modules
def expected_modules(f: NodeFacts) -> dict[str, Status]:
    """Module -> how bad its absence is. mlx5 ones only when a configured PF is Mellanox (or none was
    found, so the config presumably names one); verbs and RDMA CM only for resources with rdma."""
    rdma = any(r.rdma for r in f.config.resources)
    mlx = not f.pfs or any(p.info.vendor == MLX_VENDOR for p in f.pfs)
    want: dict[str, Status] = {}
    if mlx:
        want["mlx5_core"] = Status.FAIL
        if rdma:
            want["mlx5_ib"] = Status.FAIL
    if rdma:
        want["ib_uverbs"] = Status.FAIL
        want["rdma_ucm"] = Status.FAIL
        want["ib_umad"] = Status.WARN
    return want


_MODULE_ROLE = {
    "mlx5_core": "the ConnectX driver: PFs, VFs and their netdevs",
    "mlx5_ib": "the RDMA devices (mlx5_N) of PFs and VFs",
    "ib_uverbs": "/dev/infiniband/uverbsN, the verbs device a pod opens",
    "rdma_ucm": "/dev/infiniband/rdma_cm, RDMA connection setup (NCCL uses it)",
    "ib_umad": "/dev/infiniband/umadN/issmN (MAD tools; NCCL runs without them)",
}


def check_modules(f: NodeFacts) -> list[Check]:
    out = []
    want = expected_modules(f)
    if f.modules is None:
        return [
            Check(
                "Modules",
                "kernel modules",
                Status.SKIP,
                f"not checked: no sys/module under --sysfs-root {f.sysfs_root} (a drawn tree)",
            )
        ]
    if not want:
        return [
            Check("Modules", "kernel modules", Status.SKIP, "no Mellanox PF and no RDMA resource configured")
        ]
    for name, severity in want.items():
        state = f.modules.get(name)
        if state is None:
            out.append(
                Check(
                    "Modules",
                    name,
                    severity,
                    f"{name} is not loaded (no {f.sysfs_root.rstrip('/')}"
                    f"/sys/module/{name}): {_MODULE_ROLE[name]}",
                    "pods cannot load modules on Talos (CAP_SYS_MODULE is dropped): list it in the "
                    f"machine config, then reboot ({REBOOT})",
                    talos_modules(name),
                )
            )
        else:
            out.append(
                Check(
                    "Modules",
                    name,
                    Status.PASS,
                    f"{name} loaded ({'built in' if state == 'builtin' else 'module'}): {_MODULE_ROLE[name]}",
                )
            )
    return out


# ---------------------------------------------------------------- RDMA
NETNS_EXPLAINED = (
    "shared: sriov-cni moves only the VF netdev into the pod; every RDMA device of the node stays "
    "visible in the pod (it can open only the /dev/infiniband nodes it was given), so NCCL must be told "
    "its HCA (ncclHints: true, or NCCL_IB_HCA). exclusive: sriov-cni still moves only the netdev; the "
    "rdma CNI plugin, chained after sriov, moves the VF's RDMA device into the pod, which then sees "
    "only its own; without it the pod sees no RDMA device at all"
)


def check_rdma(f: NodeFacts) -> list[Check]:
    out: list[Check] = []
    rdma_pfs = [p for p in f.pfs if p.resource.rdma]
    if not rdma_pfs and not any(r.rdma for r in f.config.resources):
        return [Check("RDMA", "RDMA", Status.SKIP, "no resource has rdma: true")]
    for p in rdma_pfs:
        out.append(_vf_rdma(f, p))
    out.append(_netns(f))
    for p in rdma_pfs:
        out.append(_roce_v2(p))
        out.append(_port_active(p))
    return out


def _vf_rdma(f: NodeFacts, p: PfFacts) -> Check:
    pf = p.info
    if not pf.vfs:
        return Check("RDMA", "VF RDMA devices", Status.SKIP, f"{_pf_name(pf)}: no VFs to check")
    bad, in_pod, ok = [], [], []
    for vf in pf.vfs:
        if vf.rdma is None:
            if vf.netdev is None and (vf.pci_address in f.agent.allocated or f.netns.mode == "exclusive"):
                in_pod.append(vf.pci_address)  # rdma-cni moved it into the pod with the netdev
            else:
                bad.append(f"{vf.pci_address}: no RDMA device")
        elif vf.rdma.uverbs is None:
            bad.append(f"{vf.pci_address} ({vf.rdma.name}): no uverbs device")
        elif not p.dev_nodes.get(f"/dev/infiniband/{vf.rdma.uverbs}", False):
            bad.append(
                f"{vf.pci_address} ({vf.rdma.name}): /dev/infiniband/{vf.rdma.uverbs} missing under "
                f"--dev-root {f.dev_root}"
            )
        else:
            ok.append(f"{vf.rdma.name}/{vf.rdma.uverbs}")
    pod_note = f"; {len(in_pod)} in pods (their RDMA device moved with them)" if in_pod else ""
    if bad:
        return Check(
            "RDMA",
            "VF RDMA devices",
            Status.FAIL,
            f"{_pf_name(pf)}: {'; '.join(bad)}{pod_note}",
            f"{_no_rdma_remedy(pf)}; no uverbs: ib_uverbs must be loaded; a missing /dev node: mount the "
            "host's /dev at --dev-root",
            talos_modules("mlx5_ib", "ib_uverbs") if pf.vendor == MLX_VENDOR else talos_modules("ib_uverbs"),
        )
    return Check(
        "RDMA",
        "VF RDMA devices",
        Status.PASS,
        f"{_pf_name(pf)}: {len(ok)} VFs with RDMA device and uverbs node ({', '.join(ok)}){pod_note}",
    )


def _no_rdma_remedy(pf: PfInfo) -> str:
    if pf.vendor == MLX_VENDOR:
        return "no RDMA device: mlx5_ib must be loaded (and devlink param enable_rdma true)"
    return (
        f"no RDMA device: {pf.driver or 'this PF'} ({pf.vendor}:{pf.device}) is not an RDMA NIC driver; "
        "set rdma: false on this resource, or use an RDMA-capable NIC"
    )


def _netns(f: NodeFacts) -> Check:
    n = f.netns
    rdma = [r for r in f.config.resources if r.rdma]
    if n.mode is None:
        return Check(
            "RDMA",
            "netns mode",
            Status.FAIL if f.real_root else Status.SKIP,
            f"RDMA netns mode unknown: {n.source}",
            "load ib_core (mlx5_ib pulls it in) to have an RDMA subsystem at all" if f.real_root else "",
            talos_modules("mlx5_ib") if f.real_root else "",
        )
    cross = f"; but ib_core's netns_mode parameter says {n.cross_check}" if n.cross_check else ""
    evidence = f"RDMA subsystem netns mode: {n.mode} (read from {n.source}){cross}"
    unhinted = [r.resource_name for r in rdma if not r.nccl_hints]
    if n.mode == "shared" and unhinted:
        return Check(
            "RDMA",
            "netns mode",
            Status.WARN,
            evidence,
            f"in shared mode set ncclHints: true on {', '.join(unhinted)} (Allocate then sets "
            "NCCL_IB_HCA==<the pod's RDMA devices>), or switch to exclusive at boot and chain the "
            "rdma CNI after sriov in the NetworkAttachmentDefinition",
            "machine:\n  kernel:\n    modules:\n      - name: ib_core\n        parameters:\n"
            "          - netns_mode=0\n",
            note=NETNS_EXPLAINED,
        )
    if n.mode == "exclusive":
        return Check(
            "RDMA",
            "netns mode",
            Status.PASS,
            f"{evidence}; RDMA resources need the rdma CNI chained "
            "after sriov in their NetworkAttachmentDefinition (daemonset/examples/nad-dgx-qsfp.yaml)",
            note=NETNS_EXPLAINED,
        )
    return Check(
        "RDMA",
        "netns mode",
        Status.PASS,
        f"{evidence}; ncclHints is on for "
        f"{', '.join(r.resource_name for r in rdma) or 'every RDMA resource'}, so NCCL keeps to the "
        "pod's own HCAs",
        note=NETNS_EXPLAINED,
    )


def _roce_v2(p: PfFacts) -> Check:
    pf = p.info
    if pf.rdma is None:
        return Check(
            "RDMA",
            "RoCE v2 GID",
            Status.FAIL,
            f"{_pf_name(pf)}: the PF has no RDMA device",
            _no_rdma_remedy(pf),
            talos_modules("mlx5_ib") if pf.vendor == MLX_VENDOR else "",
        )
    v2 = [t for t in p.gid_types if t == "RoCE v2"]
    if not v2:
        return Check(
            "RDMA",
            "RoCE v2 GID",
            Status.FAIL,
            f"{_pf_name(pf)} {pf.rdma.name} port 1: no RoCE v2 GID in gid_attrs/types "
            f"(types: {', '.join(sorted(set(p.gid_types))) or 'none'})",
            "RoCE v2 GIDs appear for an Ethernet port with RoCE enabled: check the link layer is "
            f"Ethernet (mstconfig LINK_TYPE_P1=ETH) and `devlink dev param show pci/{pf.pci_address} "
            "name enable_roce` is true; NCCL over RoCE v2 needs them (NCCL_IB_GID_INDEX)",
        )
    return Check(
        "RDMA",
        "RoCE v2 GID",
        Status.PASS,
        f"{_pf_name(pf)} {pf.rdma.name} port 1: {len(v2)} RoCE v2 GID(s) of {len(p.gid_types)}",
    )


def _port_active(p: PfFacts) -> Check:
    pf = p.info
    port = pf.rdma.ports[0] if pf.rdma and pf.rdma.ports else None
    if pf.rdma is None or port is None:
        return Check(
            "RDMA",
            "port ACTIVE",
            Status.FAIL,
            f"{_pf_name(pf)}: no RDMA port to check",
            _no_rdma_remedy(pf),
            talos_modules("mlx5_ib") if pf.vendor == MLX_VENDOR else "",
        )
    desc = (
        f"{_pf_name(pf)} {pf.rdma.name} port {port.number}: {port.state}: {port.state_name}, "
        f"phys {port.phys_state}: {port.phys_state_name}, {port.rate or 'rate unknown'}"
    )
    if port.state != IB_PORT_ACTIVE:
        return Check(
            "RDMA",
            "port ACTIVE",
            Status.FAIL,
            desc,
            "the port follows the Ethernet link: check the cable and that the peer port is up "
            "(see Link/carrier)",
        )
    return Check("RDMA", "port ACTIVE", Status.PASS, desc)


# ---------------------------------------------------------------- link
def check_link(f: NodeFacts) -> list[Check]:
    out = []
    for p in f.pfs:
        out.append(_carrier(p))
        out.append(_mtu(p))
    return out


def _carrier(p: PfFacts) -> Check:
    pf = p.info
    nd = pf.netdev
    if nd is None:
        return Check(
            "Link",
            "carrier and speed",
            Status.FAIL,
            f"{pf.pci_address}: the PF has no netdev",
            "bind the NIC driver to the PF",
        )
    if nd.carrier is None:
        return Check(
            "Link",
            "carrier and speed",
            Status.FAIL,
            f"{_pf_name(pf)}: administratively down (operstate {nd.operstate})",
            f"the agent brings its PFs up on reconcile; by hand: `ip link set {nd.name} up`",
        )
    if not nd.carrier:
        return Check(
            "Link",
            "carrier and speed",
            Status.FAIL,
            f"{_pf_name(pf)}: no carrier (operstate {nd.operstate})",
            "check the cable and the peer port (on a DGX Spark pair: the QSFP56 cable between the "
            "two ConnectX-7 ports, both ends up)",
        )
    if nd.speed_mbps is None:
        return Check(
            "Link",
            "carrier and speed",
            Status.WARN,
            f"{_pf_name(pf)}: carrier up, speed unknown",
            "the driver reports no speed (sysfs speed is -1)",
        )
    return Check(
        "Link", "carrier and speed", Status.PASS, f"{_pf_name(pf)}: carrier up, {nd.speed_mbps} Mb/s"
    )


def _mtu(p: PfFacts) -> Check:
    pf, cfg = p.info, p.config
    if pf.netdev is None:
        return Check("Link", "MTU", Status.SKIP, f"{pf.pci_address}: no PF netdev")
    pf_mtu = pf.netdev.mtu
    problems = []
    if cfg.mtu is not None and pf_mtu != cfg.mtu:
        problems.append(f"PF MTU {pf_mtu} but config mtu {cfg.mtu}")
    vf_mtus = {vf.netdev.name: vf.netdev.mtu for vf in pf.vfs if vf.netdev is not None}
    if cfg.vf.mtu is not None:
        off = [f"{n}={m}" for n, m in vf_mtus.items() if m != cfg.vf.mtu]
        if off:
            problems.append(f"VF MTU differs from config vfMtu {cfg.vf.mtu}: {', '.join(off)}")
    above = [f"{n}={m}" for n, m in vf_mtus.items() if m > pf_mtu]
    if above:
        problems.append(
            f"VF MTU above the PF's {pf_mtu}: {', '.join(above)} (frames that big are dropped on the wire)"
        )
    vfs = ", ".join(sorted({str(m) for m in vf_mtus.values()})) or "none in the host namespace"
    summary = f"{_pf_name(pf)}: PF {pf_mtu}, VFs {vfs}"
    if problems:
        return Check(
            "Link",
            "MTU",
            Status.WARN,
            f"{summary}: {'; '.join(problems)}",
            "set mtu (PF) and vfMtu (VFs) in the config; the PF MTU must be at least every VF's, and "
            "the same on both ends of the link",
        )
    return Check("Link", "MTU", Status.PASS, summary)


# ---------------------------------------------------------------- Kubernetes
def check_kubernetes(f: NodeFacts) -> list[Check]:
    k, a = f.kube, f.agent
    out = []
    if k.kubelet_socket_state == "socket":
        out.append(Check("Kubernetes", "kubelet.sock", Status.PASS, f"{k.kubelet_socket} is a socket"))
    else:
        out.append(
            Check(
                "Kubernetes",
                "kubelet.sock",
                Status.FAIL,
                f"{k.kubelet_socket}: {k.kubelet_socket_state}",
                "is the kubelet running, and is its device-plugins directory mounted at --device-plugin-dir?",
            )
        )
    out.append(_registration(a))
    if k.devinfo_writable:
        out.append(Check("Kubernetes", "devinfo dir", Status.PASS, f"{k.devinfo_dir} is writable"))
    else:
        out.append(
            Check(
                "Kubernetes",
                "devinfo dir",
                Status.FAIL,
                f"{k.devinfo_dir}: {k.devinfo_error}",
                "mount the host's /var/run/k8s.cni.cncf.io/devinfo/dp read-write (hostPath "
                "DirectoryOrCreate): Allocate fails without it",
            )
        )
    if k.pod_resources_error:
        out.append(
            Check(
                "Kubernetes",
                "PodResources",
                Status.WARN,
                f"{k.pod_resources_socket}: {k.pod_resources_error}",
                "mount /var/lib/kubelet/pod-resources; without it the agent cannot tell which pod "
                "holds a VF and falls back to its own Allocate records",
            )
        )
    else:
        out.append(
            Check(
                "Kubernetes",
                "PodResources",
                Status.PASS,
                f"{k.pod_resources_socket} answers List ({k.pod_devices} devices held by pods)",
            )
        )
    out.append(_devinfo_files(f))
    return out


def _registration(a: AgentFacts) -> Check:
    if not a.address:
        return Check("Kubernetes", "registration", Status.SKIP, "--health-address is empty: not asked")
    if not a.reachable:
        return Check(
            "Kubernetes",
            "registration",
            Status.WARN,
            f"agent not running (no answer at {a.address}: {a.error})",
            "start the DaemonSet (`kubectl -n <ns> get ds sriov-rdma-agent`), or pass its --health-address",
        )
    regs = ", ".join(
        f"{r} {'registered' if ok else 'NOT registered'}" for r, ok in sorted(a.registered.items())
    )
    if not a.deviceplugin_serving:
        return Check(
            "Kubernetes",
            "registration",
            Status.FAIL,
            f"deviceplugin NOT_SERVING at {a.address}: {a.reason or regs or 'no reason given'}",
            "the kubelet has not accepted our registration: check kubelet.sock above and the "
            "agent's log (`kubectl -n <ns> logs ds/sriov-rdma-agent`)",
        )
    return Check("Kubernetes", "registration", Status.PASS, f"deviceplugin SERVING at {a.address}: {regs}")


def _devinfo_files(f: NodeFacts) -> Check:
    """The agent keeps one file for every VF it serves (before every registration, so Multus finds
    it for a pod the kubelet re-admits after a reboot without an Allocate)."""
    files = f.kube.devinfo_files
    if f.agent.advertised is not None:
        missing = sorted(devinfo_file_name(res, i) for res, ids in f.agent.advertised.items() for i in ids
                         if devinfo_file_name(res, i) not in files)
        if missing:
            return Check(
                "Kubernetes",
                "device-info files",
                Status.FAIL,
                f"{len(missing)} VF(s) advertised by the running agent have no file in "
                f"{f.kube.devinfo_dir}: {', '.join(missing)}",
                "Multus cannot attach such a VF to a pod the kubelet re-admits without an Allocate: "
                "check the devinfo dir check above and the agent's log (it rewrites every file before "
                "each registration, so a kubelet restart or an agent restart puts them back)",
            )
    if not files:
        return Check(
            "Kubernetes",
            "device-info files",
            Status.PASS,
            f"none in {f.kube.devinfo_dir} (the agent is not running, or serves no VF)",
        )
    advertised: dict[str, set[str]] = {}
    source = "the running agent"
    if f.agent.advertised is not None:
        for res, ids in f.agent.advertised.items():
            advertised[res] = set(ids)
    else:
        source = "this node's VFs (agent not asked)"
        for p in f.pfs:
            advertised.setdefault(p.resource.resource_name, set()).update(v.pci_address for v in p.info.vfs)
    rdma_of = {vf.pci_address: vf.rdma.name for p in f.pfs for vf in p.info.vfs if vf.rdma}
    expected = {devinfo_file_name(res, i): (res, i) for res, ids in advertised.items() for i in ids}
    bad, stale = [], []
    for name, content in sorted(files.items()):
        if name not in expected:
            stale.append(name)
            continue
        _, dev_id = expected[name]
        try:
            pci = json.loads(content)["pci"]
            addr, rdma = pci["pci-address"], pci.get("rdma-device")
        except (ValueError, KeyError, TypeError):
            bad.append(f"{name}: not a device-info document")
            continue
        if addr != dev_id:
            bad.append(f"{name}: pci-address {addr}")
        elif rdma and dev_id in rdma_of and rdma_of[dev_id] != rdma:
            bad.append(f"{name}: rdma-device {rdma}, but the VF's is {rdma_of[dev_id]}")
    if bad:
        return Check(
            "Kubernetes",
            "device-info files",
            Status.FAIL,
            "; ".join(bad),
            "a wrong file misleads sriov-cni/Multus for the next pod: delete it; the agent writes a "
            "fresh one before its next registration and at the next Allocate of that VF",
        )
    if stale:
        return Check(
            "Kubernetes",
            "device-info files",
            Status.WARN,
            f"{len(stale)} file(s) for devices not advertised by {source}: {', '.join(stale)}",
            "left from VFs that are gone or a renamed resource; safe to delete",
        )
    return Check(
        "Kubernetes",
        "device-info files",
        Status.PASS,
        f"{len(files)} file(s), each for a VF advertised by {source}, with its current RDMA device",
    )


# ---------------------------------------------------------------- Talos
NEVER_WRITES = (
    "the agent never writes under /etc (no udev rules, no modprobe.d, no state files), never "
    "loads modules, never sets kernel arguments and never reboots; it writes only sysfs attributes "
    "(sriov_numvfs, sriov_drivers_autoprobe, driver_override, driver bind/probe), its sockets in "
    "--device-plugin-dir and device-info files in --devinfo-dir"
)


def check_talos(f: NodeFacts) -> list[Check]:
    t = f.talos
    talos = bool(t.kernel_release and "talos" in t.kernel_release)
    under_etc = [
        f"{flag} {path}"
        for flag, path in t.write_paths.items()
        if path == "/etc"
        or path.startswith("/etc/")
        or path == t.etc_path
        or path.startswith(t.etc_path.rstrip("/") + "/")
    ]
    if not t.real_root:
        etc = "/etc not checked (simulated --sysfs-root; only the real root shows the host's /etc)"
    elif t.etc_read_only is None:
        etc = f"host /etc not visible at {t.etc_path} (not mounted into this container): not checked"
    else:
        etc = f"{t.etc_path} is {'read-only (as on Talos)' if t.etc_read_only else 'writable'}"
    kernel = (
        f"kernel {t.kernel_release}{' (Talos)' if talos else ''}" if t.kernel_release else "kernel not read"
    )
    evidence = f"{etc}; {kernel}"
    if under_etc:
        return [
            Check(
                "Talos",
                "read-only /etc",
                Status.FAIL,
                f"{evidence}; the agent would write under /etc: {', '.join(under_etc)}",
                "point these flags outside /etc (Talos keeps /etc read-only): "
                "the defaults /var/lib/kubelet/device-plugins and /var/run/k8s.cni.cncf.io/devinfo/dp work",
            )
        ]
    return [Check("Talos", "read-only /etc", Status.PASS, f"{evidence}; {NEVER_WRITES}")]


# ---------------------------------------------------------------- all of it
CHECKS: tuple[Callable[[NodeFacts], list[Check]], ...] = (
    check_sriov,
    check_iommu,
    check_modules,
    check_rdma,
    check_link,
    check_kubernetes,
    check_talos,
)


def run_checks(facts: NodeFacts) -> list[Check]:
    return [c for check in CHECKS for c in check(facts)]


def exit_code(checks: Sequence[Check]) -> int:
    """0: all well (PASS, WARN, SKIP); 1: at least one FAIL."""
    return 1 if any(c.status is Status.FAIL for c in checks) else 0


def render(checks: Sequence[Check]) -> str:
    """Grouped by area; each line STATUS  check  evidence, then the remedy and any Talos snippet."""
    lines: list[str] = []
    area = ""
    width = max((len(c.name) for c in checks), default=0)
    for c in checks:
        if c.area != area:
            area = c.area
            lines.append(f"{'' if not lines else chr(10)}{area}")
        lines.append(f"  {c.status.value}  {c.name.ljust(width)}  {c.evidence}")
        pad = " " * (8 + width)
        if c.note:
            lines.append(f"{pad}note: {c.note}")
        if c.remedy and c.status is not Status.PASS:
            lines.append(f"{pad}fix: {c.remedy}")
        if c.talos and c.status is not Status.PASS:
            lines.append(
                f"{pad}Talos machine config (talosctl -n <node> patch machineconfig --patch @fix.yaml):"
            )
            lines += [f"{pad}  {line}" for line in c.talos.rstrip().splitlines()]
    counts = {s: sum(1 for c in checks if c.status is s) for s in Status}
    lines.append("\n" + ", ".join(f"{n} {s.value}" for s, n in counts.items()))
    return "\n".join(lines)


def document(checks: Sequence[Check]) -> dict[str, object]:
    """The --json form."""
    return {
        "checks": [c.as_dict() for c in checks],
        "summary": {s.value: sum(1 for c in checks if c.status is s) for s in Status},
        "exit_code": exit_code(checks),
    }
