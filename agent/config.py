"""The agent's config file: a frozen tree parsed and validated in one place.

Canonical form (YAML)::

    resources:
      - resourceName: nvidia.com/cx7_qsfp
        pfs:
          - pfName: enP2p1s0f0np0      # or pciAddress: "0002:01:00.0", or vendor: "15b3" + device: "1021"
            numVfs: 4

Every error names the dotted field path and the value (cut short), so an operator can fix the
ConfigMap from the log line alone.

The file comes from outside and is read at start and on every hot reload, so its cost is bounded
before any of it is believed: at most ``MAX_CONFIG_BYTES``, strict UTF-8, at most ``MAX_YAML_DEPTH``
levels of nesting and ``MAX_YAML_NODES`` YAML nodes, where each use of an alias counts the whole
subtree it stands for. Anchors and aliases stay allowed (an operator may share VF settings between
PFs with ``<<: *defaults``), but a "billion laughs" file is refused after a few thousand nodes instead
of expanding; a recursive alias is refused outright.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, replace
from typing import Any, Literal

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.error import Mark
from yaml.events import AliasEvent
from yaml.nodes import Node

from agent.errors import ConfigError, shorten
from agent.model import is_pci_address

# Kubelet accepts extended resources "<domain>/<name>"; the domain may not be kubernetes.io.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_HEX_ID = re.compile(r"^(0x)?[0-9a-fA-F]{4}$")
_IFNAME = re.compile(r"^[^/\s:]{1,15}$")
_DRIVER = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")

# PCIe SR-IOV caps TotalVFs at 65535; mlx5 firmware at 127 per PF on CX-7. 2048 is a sane bound
# that still catches typos such as 40000.
MAX_NUM_VFS = 2048
MIN_MTU = 68
MAX_MTU = 65535

# Bounds on the file itself. A real config is a few hundred bytes; 1 MiB holds hundreds of PFs
# with every field set, and parses in well under a second.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 32  # the schema needs 6 levels
MAX_YAML_NODES = 20_000  # a config at MAX_PFS PFs with every field set has about 10,000
MAX_RESOURCES = 64  # one gRPC server and socket each
MAX_PFS = 256  # PF entries in all resources together; a node has a handful

MacPolicy = Literal["keep", "stable"]
LinkState = Literal["auto", "enable", "disable"]
ResetOnRelease = Literal["none", "settings", "flr"]  # what a VF gets when its pod lets go of it
RESET_MODES: tuple[ResetOnRelease, ...] = ("none", "settings", "flr")
# What a resource hands a pod (agent/core/kinds): the VF's netdev with its RDMA devices (sriov-cni
# moves it), or the whole VF bound to vfio-pci for userspace (DPDK, KubeVirt).
DeviceType = Literal["netdevice", "vfio-pci"]
DEVICE_TYPES: tuple[DeviceType, ...] = ("netdevice", "vfio-pci")
VFIO_PCI: DeviceType = "vfio-pci"


@dataclass(frozen=True)
class PfSelector:
    """Exactly one way of naming a PF."""

    pf_name: str | None = None
    pci_address: str | None = None
    vendor: str | None = None  # 4 hex digits, lower case, no 0x
    device: str | None = None

    def describe(self) -> str:
        if self.pf_name:
            return f"pfName={self.pf_name}"
        if self.pci_address:
            return f"pciAddress={self.pci_address}"
        return f"vendor={self.vendor},device={self.device}"


@dataclass(frozen=True)
class VfSettings:
    """Per-VF settings applied through netlink on the PF. None means: leave the kernel's value."""

    mac: MacPolicy = "keep"
    trust: bool | None = None
    spoofchk: bool | None = None
    link_state: LinkState | None = None
    vlan: int | None = None
    qos: int | None = None
    min_tx_rate: int | None = None  # Mbit/s, as the kernel's IFLA_VF_RATE
    max_tx_rate: int | None = None
    mtu: int | None = None


@dataclass(frozen=True)
class PfConfig:
    """Desired state of one PF."""

    selector: PfSelector
    num_vfs: int | None  # None only when externally managed and not given
    externally_managed: bool = False
    vf_driver: str | None = None
    drivers_autoprobe: bool | None = None
    mtu: int | None = None
    vf: VfSettings = VfSettings()
    reset_on_release: ResetOnRelease = "settings"


@dataclass(frozen=True)
class ResourceConfig:
    resource_name: str
    pfs: tuple[PfConfig, ...]
    rdma: bool = True  # devices need an RDMA device to be healthy and get /dev/infiniband specs
    nccl_hints: bool = False  # Allocate also sets NCCL_IB_HCA to the allocated VFs' RDMA devices
    device_type: DeviceType = "netdevice"  # vfio-pci: every PF's vfDriver is vfio-pci, rdma is off

    @property
    def socket_name(self) -> str:
        """The device-plugin socket file, named like the community plugin's (nvidia.com_cx7_qsfp.sock)."""
        return self.resource_name.replace("/", "_") + ".sock"

    @property
    def env_name(self) -> str:
        """PCIDEVICE_<RESOURCE>: upper-cased, every non-alphanumeric turned into '_'."""
        return "PCIDEVICE_" + re.sub(r"[^A-Za-z0-9]", "_", self.resource_name).upper()


@dataclass(frozen=True)
class LifecycleTimeouts:
    """Optional ``lifecycle:`` section; None keeps the agent's defaults (120 s, 120 s, 30 s)."""

    sysfs_write_s: float | None = None  # one sriov_numvfs / bind write
    vf_wait_s: float | None = None  # new VFs (and their netdevs) to appear
    startup_wait_s: float | None = None  # how long the start-up reconcile may delay serving


# A recovered device is reported Healthy only after this long (seconds) without a relapse.
DEFAULT_RECOVERY_S = 2.0
MAX_RECOVERY_S = 600


@dataclass(frozen=True)
class HealthSettings:
    """Optional ``health:`` section. ``recoverySeconds`` damps flapping links: Unhealthy is always
    reported at once, Healthy only once the device stayed healthy this long (0: at once)."""

    recovery_s: float = DEFAULT_RECOVERY_S


@dataclass(frozen=True)
class Config:
    resources: tuple[ResourceConfig, ...]
    lifecycle: LifecycleTimeouts = LifecycleTimeouts()
    health: HealthSettings = HealthSettings()

    def all_pfs(self) -> tuple[tuple[ResourceConfig, PfConfig], ...]:
        return tuple((r, p) for r in self.resources for p in r.pfs)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a budget: nesting depth, and nodes counted as if aliases were expanded.

    PyYAML itself shares an aliased node instead of copying it, so loading a billion laughs is cheap;
    the cost comes later, from anything that walks the value (an error message formatting it). The
    budget refuses such a file while composing it, before any of it is constructed.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0
        self._expanded: dict[int, int] = {}  # id(node) -> nodes its subtree stands for, when complete

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        if self.check_event(AliasEvent):
            node = super().compose_node(parent, index)
            size = self._expanded.get(id(node))
            if size is None:
                raise ComposerError(None, None, f"alias *{shorten(event.anchor)} refers to the node that "
                                    "contains it (a recursive structure)", event.start_mark)
            self._count(size, event.start_mark)
            return node
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                event.start_mark)
        before = self._nodes
        self._count(1, event.start_mark)
        node = super().compose_node(parent, index)
        self._expanded[id(node)] = self._nodes - before
        self._depth -= 1
        return node

    def _count(self, n: int, mark: Mark) -> None:
        self._nodes += n
        if self._nodes > MAX_YAML_NODES:
            raise ComposerError(None, None, f"more than {MAX_YAML_NODES} YAML nodes (each use of an "
                                "alias counts the nodes it stands for)", mark)

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        """Scalar constructors raise plain Python errors for YAML they cannot represent
        (``2001-02-30``, a 5,000-digit int, ``!!timestamp x``, ``!!int ""``): give them the node's
        position."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError, LookupError, OverflowError) as e:
            raise ConstructorError(None, None, f"cannot read {node.tag.rsplit(':', 1)[-1]} value: "
                                   f"{shorten(str(e))}", node.start_mark) from e


def parse_config(data: str | bytes) -> Config:
    """Parse YAML into a validated Config, or raise ConfigError naming the bad field.

    ``data`` is the file's bytes as read (strict UTF-8), or text. Nothing but ConfigError leaves here.
    """
    if isinstance(data, bytes):
        size = len(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError("<file>", f"byte 0x{data[e.start]:02x} at offset {e.start}",
                              "not UTF-8 text") from None
    else:
        text = data
        size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_CONFIG_BYTES:
        raise ConfigError("<file>", f"{size} bytes", f"larger than the limit of {MAX_CONFIG_BYTES} bytes")
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # the reader refuses control characters here already
        raw = loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        position = getattr(e, "position", None)  # a ReaderError: an unacceptable character
        where = (f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None
                 else f"character {position}" if position is not None else "?")
        problem = getattr(e, "problem", None) or str(e).split("\n", 1)[0]
        raise ConfigError("<file>", where, f"not valid YAML: {shorten(str(problem), 200)}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return config_from_obj(raw)


def read_config_bytes(path: str) -> bytes:
    """The config file's bytes, refused (ConfigError) when it is not a regular file or too large
    to be a config, without reading more than the limit."""
    try:
        # O_NONBLOCK: a FIFO at the config path is refused below instead of blocking the open.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError("--config", path, "not a regular file")
            if st.st_size > MAX_CONFIG_BYTES:
                raise ConfigError("--config", path, f"{st.st_size} bytes is larger than the limit of "
                                  f"{MAX_CONFIG_BYTES} bytes")
            return f.read(MAX_CONFIG_BYTES + 1)  # a file that grew meanwhile fails parse_config's check
    except OSError as e:
        raise ConfigError("--config", path, f"cannot read: {e.strerror}") from e


def config_from_obj(raw: object) -> Config:
    root = _mapping(raw, "<root>", allowed={"version", "resources", "lifecycle", "health"})
    version = root.get("version", "v1")
    if version != "v1":
        raise ConfigError("version", version, "only 'v1' is supported")
    res_raw = root.get("resources")
    if not isinstance(res_raw, list) or not res_raw:
        raise ConfigError("resources", res_raw, "must be a non-empty list")
    if len(res_raw) > MAX_RESOURCES:
        raise ConfigError("resources", f"{len(res_raw)} entries", f"at most {MAX_RESOURCES} resources")
    pf_count = sum(len(r["pfs"]) for r in res_raw if isinstance(r, dict) and isinstance(r.get("pfs"), list))
    if pf_count > MAX_PFS:
        raise ConfigError("resources", f"{pf_count} PF entries", f"at most {MAX_PFS} PFs in all resources")
    resources = tuple(_resource(r, f"resources[{i}]") for i, r in enumerate(res_raw))

    names: dict[str, str] = {}
    pf_owner: dict[str, str] = {}
    for i, res in enumerate(resources):
        where = f"resources[{i}].resourceName"
        if res.resource_name in names:
            raise ConfigError(where, res.resource_name, f"duplicate of {names[res.resource_name]}")
        names[res.resource_name] = where
        for j, pf in enumerate(res.pfs):
            key = pf.selector.describe()
            path = f"resources[{i}].pfs[{j}]"
            if key in pf_owner:
                raise ConfigError(path, key, f"the same PF is already claimed by {pf_owner[key]}")
            pf_owner[key] = path
    return Config(resources=resources, lifecycle=_lifecycle(root.get("lifecycle")),
                  health=_health(root.get("health")))


def _health(raw: object) -> HealthSettings:
    if raw is None:
        return HealthSettings()
    m = _mapping(raw, "health", allowed={"recoverySeconds"})
    val = m.get("recoverySeconds", DEFAULT_RECOVERY_S)
    if isinstance(val, bool) or not isinstance(val, int | float) or not 0 <= val <= MAX_RECOVERY_S:
        raise ConfigError("health.recoverySeconds", val,
                          f"must be a number of seconds from 0 to {MAX_RECOVERY_S}")
    return HealthSettings(recovery_s=float(val))


def _lifecycle(raw: object) -> LifecycleTimeouts:
    if raw is None:
        return LifecycleTimeouts()
    keys = {"sysfsWriteTimeoutSeconds": "sysfs_write_s", "vfWaitTimeoutSeconds": "vf_wait_s",
            "startupWaitSeconds": "startup_wait_s"}
    m = _mapping(raw, "lifecycle", allowed=set(keys))
    values: dict[str, float] = {}
    for key, name in keys.items():
        val = m.get(key)
        if val is None:
            continue
        if isinstance(val, bool) or not isinstance(val, int | float) or not 0 < val <= 3600:
            raise ConfigError(f"lifecycle.{key}", val, "must be a number of seconds above 0 and at most 3600")
        values[name] = float(val)
    return LifecycleTimeouts(**values)


def _resource(raw: object, path: str) -> ResourceConfig:
    m = _mapping(raw, path, allowed={"resourceName", "pfs", "rdma", "ncclHints", "deviceType"})
    name = m.get("resourceName")
    _check_resource_name(name, f"{path}.resourceName")
    assert isinstance(name, str)
    device_type = m.get("deviceType", "netdevice")
    if device_type not in DEVICE_TYPES:
        raise ConfigError(f"{path}.deviceType", device_type, f"must be one of {', '.join(DEVICE_TYPES)}")
    pfs_raw = m.get("pfs")
    if not isinstance(pfs_raw, list) or not pfs_raw:
        raise ConfigError(f"{path}.pfs", pfs_raw, "must be a non-empty list of PFs")
    pfs = tuple(_pf(p, f"{path}.pfs[{j}]") for j, p in enumerate(pfs_raw))
    rdma = _opt_bool(m, "rdma", path)
    nccl_hints = _opt_bool(m, "ncclHints", path) or False
    if device_type == VFIO_PCI:
        return _vfio_resource(name, pfs, path, rdma, nccl_hints)
    if nccl_hints and rdma is False:
        raise ConfigError(f"{path}.ncclHints", nccl_hints, "needs rdma: the hints name the VFs' RDMA devices")
    return ResourceConfig(resource_name=name, pfs=pfs, rdma=True if rdma is None else rdma,
                          nccl_hints=nccl_hints)


def _vfio_resource(name: str, pfs: tuple[PfConfig, ...], path: str, rdma: bool | None,
                   nccl_hints: bool) -> ResourceConfig:
    """deviceType vfio-pci: the lifecycle binds every VF to vfio-pci (the vfDriver it implies), and a
    VF bound to vfio-pci has neither a netdev nor an RDMA device, so settings that need one are refused."""
    why = "a VF bound to vfio-pci has no RDMA device (deviceType vfio-pci)"
    if rdma:
        raise ConfigError(f"{path}.rdma", rdma, f"contradicts deviceType vfio-pci: {why}")
    if nccl_hints:
        raise ConfigError(f"{path}.ncclHints", nccl_hints, f"contradicts deviceType vfio-pci: {why}")
    bound = []
    for j, pf in enumerate(pfs):
        if pf.vf_driver is not None and pf.vf_driver != VFIO_PCI:
            raise ConfigError(f"{path}.pfs[{j}].vfDriver", pf.vf_driver,
                              f"contradicts deviceType vfio-pci: its VFs are bound to {VFIO_PCI} "
                              "(leave vfDriver out or set it to vfio-pci)")
        if pf.vf.mtu is not None:
            raise ConfigError(f"{path}.pfs[{j}].vfMtu", pf.vf.mtu,
                              "contradicts deviceType vfio-pci: a VF bound to vfio-pci has no netdev")
        bound.append(replace(pf, vf_driver=VFIO_PCI))
    return ResourceConfig(resource_name=name, pfs=tuple(bound), rdma=False, device_type=VFIO_PCI)


_PF_KEYS = {
    "pfName", "pciAddress", "vendor", "device", "numVfs", "externallyManaged", "vfDriver",
    "driversAutoprobe", "mtu", "vfMtu", "mac", "trust", "spoofchk", "linkState", "vlan", "qos",
    "minTxRate", "maxTxRate", "resetOnRelease",
}


def _pf(raw: object, path: str) -> PfConfig:
    m = _mapping(raw, path, allowed=_PF_KEYS)
    selector = _selector(m, path)
    ext = _opt_bool(m, "externallyManaged", path) or False
    num_vfs = _opt_int(m, "numVfs", path, 0, MAX_NUM_VFS)
    if num_vfs is None and not ext:
        raise ConfigError(f"{path}.numVfs", None, "is required unless externallyManaged is true")
    vf_driver = m.get("vfDriver")
    if vf_driver is not None and (not isinstance(vf_driver, str) or not _DRIVER.match(vf_driver)):
        raise ConfigError(f"{path}.vfDriver", vf_driver, "must be a kernel driver name such as mlx5_core")
    mac = m.get("mac", "keep")
    if mac not in ("keep", "stable"):
        raise ConfigError(f"{path}.mac", mac, "must be 'keep' or 'stable'")
    link_state = m.get("linkState")
    if link_state is not None and link_state not in ("auto", "enable", "disable"):
        raise ConfigError(f"{path}.linkState", link_state, "must be one of auto, enable, disable")
    vlan = _opt_int(m, "vlan", path, 0, 4094)
    qos = _opt_int(m, "qos", path, 0, 7)
    if qos is not None and vlan is None:
        raise ConfigError(f"{path}.qos", qos, "needs vlan to be set")
    min_rate = _opt_int(m, "minTxRate", path, 0, 10_000_000)
    max_rate = _opt_int(m, "maxTxRate", path, 0, 10_000_000)
    if min_rate and max_rate and min_rate > max_rate:
        raise ConfigError(f"{path}.minTxRate", min_rate, f"is above maxTxRate {max_rate}")
    reset = m.get("resetOnRelease", "settings")
    if reset not in RESET_MODES:
        raise ConfigError(f"{path}.resetOnRelease", reset, "must be one of none, settings, flr")
    vf = VfSettings(
        mac=mac,
        trust=_opt_bool(m, "trust", path),
        spoofchk=_opt_bool(m, "spoofchk", path),
        link_state=link_state,
        vlan=vlan,
        qos=qos,
        min_tx_rate=min_rate,
        max_tx_rate=max_rate,
        mtu=_opt_int(m, "vfMtu", path, MIN_MTU, MAX_MTU),
    )
    return PfConfig(
        selector=selector,
        num_vfs=num_vfs,
        externally_managed=ext,
        vf_driver=vf_driver,
        drivers_autoprobe=_opt_bool(m, "driversAutoprobe", path),
        mtu=_opt_int(m, "mtu", path, MIN_MTU, MAX_MTU),
        vf=vf,
        reset_on_release=reset,
    )


def _selector(m: dict[str, Any], path: str) -> PfSelector:
    given = [k for k in ("pfName", "pciAddress", "vendor") if k in m]
    if "device" in m and "vendor" not in m:
        raise ConfigError(f"{path}.device", m["device"], "needs vendor as well")
    if len(given) != 1:
        raise ConfigError(path, sorted(given),
                          "name the PF exactly one way: pfName, pciAddress, or vendor+device")
    if "pfName" in m:
        name = m["pfName"]
        if not isinstance(name, str) or not _IFNAME.match(name):
            raise ConfigError(f"{path}.pfName", name,
                              "must be a network interface name (1-15 chars, no '/', ':' or space)")
        return PfSelector(pf_name=name)
    if "pciAddress" in m:
        addr = m["pciAddress"]
        if not isinstance(addr, str) or not is_pci_address(addr.lower()):
            raise ConfigError(f"{path}.pciAddress", addr,
                              "must be a full PCI address like 0000:01:00.0 (quote it in YAML)")
        return PfSelector(pci_address=addr.lower())
    vendor, device = m.get("vendor"), m.get("device")
    for key, val in (("vendor", vendor), ("device", device)):
        if not isinstance(val, str) or not _HEX_ID.match(val):
            raise ConfigError(f"{path}.{key}", val, "must be 4 hex digits as a string, e.g. \"15b3\"")
    assert isinstance(vendor, str) and isinstance(device, str)
    return PfSelector(vendor=_hex(vendor), device=_hex(device))


def _hex(text: str) -> str:
    return text.lower().removeprefix("0x")


def _check_resource_name(name: object, path: str) -> None:
    if not isinstance(name, str):
        raise ConfigError(path, name, "must be a string like nvidia.com/cx7_qsfp")
    domain, sep, short = name.partition("/")
    if not sep or not domain or not short:
        raise ConfigError(path, name, "must be '<domain>/<name>', e.g. nvidia.com/cx7_qsfp")
    # The kubelet checks "requests.<name>" (the quota form), hence the 244 and the reserved prefix.
    if len(domain) > 244 or not _DNS_SUBDOMAIN.match(domain) or domain.startswith("requests."):
        raise ConfigError(path, name, "the domain part must be a lower-case DNS subdomain "
                          "(at most 244 chars, not starting with 'requests.')")
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
        raise ConfigError(path, name, "kubernetes.io is reserved; extended resources need another domain")
    if len(short) > 63 or not _QUALIFIED_NAME.match(short):
        raise ConfigError(path, name,
                          "the name part must be 1-63 chars of [A-Za-z0-9_.-], alphanumeric at both ends")


def _mapping(raw: object, path: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(path, raw, "must be a mapping")
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{path}.{shorten(key)}", raw[key],
                              f"unknown field; allowed: {', '.join(sorted(allowed))}")
    return raw


def _opt_bool(m: dict[str, Any], key: str, path: str) -> bool | None:
    val = m.get(key)
    if val is None:
        return None
    if not isinstance(val, bool):
        raise ConfigError(f"{path}.{key}", val, "must be true or false")
    return val


def _opt_int(m: dict[str, Any], key: str, path: str, lo: int, hi: int) -> int | None:
    val = m.get(key)
    if val is None:
        return None
    if isinstance(val, bool) or not isinstance(val, int):
        raise ConfigError(f"{path}.{key}", val, "must be a whole number")
    if not lo <= val <= hi:
        raise ConfigError(f"{path}.{key}", val, f"must be between {lo} and {hi}")
    return val
