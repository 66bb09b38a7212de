"""Bad configs are refused with an error naming the field (dotted path) and the offending value."""

from __future__ import annotations

import pytest

from agent.config import MAX_NUM_VFS, parse_config
from agent.errors import ConfigError


def _cfg(pf: str = "{pfName: enP2p1s0f0np0, numVfs: 4}", name: str = "nvidia.com/cx7_qsfp",
         extra: str = "") -> str:
    """A one-resource config; ``pf`` is the PF entry in YAML flow style."""
    return f"resources:\n  - resourceName: {name}\n{extra}    pfs:\n      - {pf}\n"


def _pf(fields: str) -> str:
    return _cfg("{pfName: a, numVfs: 4, " + fields + "}")


P = "resources[0].pfs[0]"
VFIO = "    deviceType: vfio-pci\n"
R = "resources[0].resourceName"
HR = "health.recoverySeconds"

BAD = [
    # (case, yaml, field, value)
    ("numVfs negative", _cfg("{pfName: a, numVfs: -1}"), f"{P}.numVfs", -1),
    ("numVfs huge", _cfg("{pfName: a, numVfs: 40000}"), f"{P}.numVfs", 40000),
    ("numVfs a string", _cfg('{pfName: a, numVfs: "4"}'), f"{P}.numVfs", "4"),
    ("numVfs a float", _cfg("{pfName: a, numVfs: 2.5}"), f"{P}.numVfs", 2.5),
    ("numVfs a bool", _cfg("{pfName: a, numVfs: true}"), f"{P}.numVfs", True),
    ("numVfs missing", _cfg("{pfName: a}"), f"{P}.numVfs", None),
    ("unknown PF field", _pf("numvfs: 2"), f"{P}.numvfs", 2),
    ("unknown resource field", _cfg(extra="    resoureName: x\n"), "resources[0].resoureName", "x"),
    ("unknown top-level field", "resource: []\n", "<root>.resource", []),
    ("no resources", "resources: []\n", "resources", []),
    ("empty file", "", "<root>", None),
    ("not YAML", "resources: [\n", "<file>", "line 2, column 1"),
    ("bad version", "version: v2\nresources: []\n", "version", "v2"),
    ("resource name without domain", _cfg(name="cx7_qsfp"), R, "cx7_qsfp"),
    ("resource name upper-case domain", _cfg(name="NVIDIA.com/cx7"), R, "NVIDIA.com/cx7"),
    ("resource name in kubernetes.io", _cfg(name="kubernetes.io/vf"), R, "kubernetes.io/vf"),
    ("resource name in a kubernetes.io subdomain", _cfg(name="x.kubernetes.io/vf"), R, "x.kubernetes.io/vf"),
    ("resource name with a space", _cfg(name="'nvidia.com/cx7 qsfp'"), R, "nvidia.com/cx7 qsfp"),
    ("resource name too long", _cfg(name="nvidia.com/" + "a" * 64), R, "nvidia.com/" + "a" * 64),
    ("resource name with requests. prefix", _cfg(name="requests.example.com/x"), R, "requests.example.com/x"),
    ("resource name not a string", _cfg(name="7"), R, 7),
    ("empty pfs", "resources:\n  - resourceName: a.com/b\n    pfs: []\n", "resources[0].pfs", []),
    ("no selector", _cfg("{numVfs: 4}"), P, []),
    ("two selectors", _cfg('{pfName: a, pciAddress: "0000:01:00.0", numVfs: 4}'), P,
     ["pciAddress", "pfName"]),
    ("device without vendor", _cfg('{device: "1021", numVfs: 4}'), f"{P}.device", "1021"),
    ("vendor without device", _cfg('{vendor: "15b3", numVfs: 4}'), f"{P}.device", None),
    ("vendor as a YAML number", _cfg('{vendor: 1521, device: "1021", numVfs: 4}'), f"{P}.vendor", 1521),
    ("pciAddress short form", _cfg('{pciAddress: "01:00.0", numVfs: 4}'), f"{P}.pciAddress", "01:00.0"),
    ("pciAddress bad function", _cfg('{pciAddress: "0000:01:00.9", numVfs: 4}'), f"{P}.pciAddress",
     "0000:01:00.9"),
    ("pfName too long", _cfg("{pfName: enP2p1s0f0np0xxxxx, numVfs: 4}"), f"{P}.pfName", "enP2p1s0f0np0xxxxx"),
    ("pfName with a slash", _cfg("{pfName: a/b, numVfs: 4}"), f"{P}.pfName", "a/b"),
    ("qos without vlan", _pf("qos: 3"), f"{P}.qos", 3),
    ("vlan out of range", _pf("vlan: 4095"), f"{P}.vlan", 4095),
    ("minTxRate above maxTxRate", _pf("minTxRate: 10, maxTxRate: 5"), f"{P}.minTxRate", 10),
    ("mac policy unknown", _pf("mac: random"), f"{P}.mac", "random"),
    ("linkState unknown", _pf("linkState: up"), f"{P}.linkState", "up"),
    ("trust not a bool", _pf('trust: "yes"'), f"{P}.trust", "yes"),
    ("mtu too small", _pf("mtu: 10"), f"{P}.mtu", 10),
    ("vfDriver with a path", _pf("vfDriver: ../x"), f"{P}.vfDriver", "../x"),
    ("rdma not a bool", _cfg(extra="    rdma: 1\n"), "resources[0].rdma", 1),
    ("ncclHints not a bool", _cfg(extra="    ncclHints: maybe\n"), "resources[0].ncclHints", "maybe"),
    ("ncclHints without rdma", _cfg(extra="    rdma: false\n    ncclHints: true\n"),
     "resources[0].ncclHints", True),
    ("deviceType unknown", _cfg(extra="    deviceType: dpdk\n"), "resources[0].deviceType", "dpdk"),
    ("deviceType vfio-pci with rdma", _cfg(extra=f"{VFIO}    rdma: true\n"), "resources[0].rdma", True),
    ("deviceType vfio-pci with ncclHints", _cfg(extra=f"{VFIO}    ncclHints: true\n"),
     "resources[0].ncclHints", True),
    ("deviceType vfio-pci with another vfDriver",
     _cfg("{pfName: a, numVfs: 4, vfDriver: mlx5_core}", extra=VFIO), f"{P}.vfDriver", "mlx5_core"),
    ("deviceType vfio-pci with vfMtu",
     _cfg("{pfName: a, numVfs: 4, vfMtu: 9000}", extra=VFIO), f"{P}.vfMtu", 9000),
    ("pf entry not a mapping", "resources:\n  - resourceName: a.com/b\n    pfs: [enp1]\n", P, "enp1"),
    ("duplicate resource", "resources:\n"
     "  - {resourceName: a.com/b, pfs: [{pfName: x, numVfs: 1}]}\n"
     "  - {resourceName: a.com/b, pfs: [{pfName: y, numVfs: 1}]}\n", "resources[1].resourceName", "a.com/b"),
    ("same PF in two resources", "resources:\n"
     "  - {resourceName: a.com/b, pfs: [{pfName: x, numVfs: 1}]}\n"
     "  - {resourceName: a.com/c, pfs: [{pfName: x, numVfs: 1}]}\n", "resources[1].pfs[0]", "pfName=x"),
    ("health.recoverySeconds negative", _cfg() + "health: {recoverySeconds: -1}\n", HR, -1),
    ("health.recoverySeconds too long", _cfg() + "health: {recoverySeconds: 601}\n", HR, 601),
    ("health.recoverySeconds a string", _cfg() + "health: {recoverySeconds: '2s'}\n", HR, "2s"),
    ("health unknown field", _cfg() + "health: {settle: 1}\n", "health.settle", 1),
]


@pytest.mark.parametrize(("text", "field", "value"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_names_field_and_value(text: str, field: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert err.value.field == field
    assert err.value.value == value
    assert str(err.value).startswith(f"config: {field}: ")
    assert repr(value) in str(err.value)


def test_canonical_config_parses_to_the_documented_values() -> None:
    cfg = parse_config(
        "resources:\n"
        "  - resourceName: nvidia.com/cx7_qsfp\n"
        "    pfs:\n"
        "      - pfName: enP2p1s0f0np0\n        numVfs: 4\n"
        "      - pciAddress: \"0002:01:00.1\"\n        numVfs: 2\n        vlan: 100\n        qos: 3\n"
        "  - resourceName: example.com/all_cx7\n    rdma: false\n"
        "    pfs:\n      - vendor: \"0x15B3\"\n        device: \"1021\"\n        externallyManaged: true\n")
    qsfp, allcx7 = cfg.resources
    assert qsfp.socket_name == "nvidia.com_cx7_qsfp.sock"
    assert qsfp.env_name == "PCIDEVICE_NVIDIA_COM_CX7_QSFP"
    assert [p.selector.describe() for p in qsfp.pfs] == ["pfName=enP2p1s0f0np0", "pciAddress=0002:01:00.1"]
    assert (qsfp.pfs[1].num_vfs, qsfp.pfs[1].vf.vlan, qsfp.pfs[1].vf.qos) == (2, 100, 3)
    assert qsfp.rdma and not allcx7.rdma
    assert not qsfp.nccl_hints and not allcx7.nccl_hints  # off unless asked for: parity by default
    assert allcx7.pfs[0].selector.describe() == "vendor=15b3,device=1021"
    assert allcx7.pfs[0].num_vfs is None and allcx7.pfs[0].externally_managed


def test_numvfs_bounds_are_inclusive() -> None:
    top = parse_config(_cfg(f"{{pfName: a, numVfs: {MAX_NUM_VFS}}}"))
    assert top.resources[0].pfs[0].num_vfs == MAX_NUM_VFS
    assert parse_config(_cfg("{pfName: a, numVfs: 0}")).resources[0].pfs[0].num_vfs == 0


def test_env_name_replaces_every_non_alphanumeric() -> None:
    cfg = parse_config(_cfg(name="example-corp.io/cx7.qsfp-a"))
    assert cfg.resources[0].env_name == "PCIDEVICE_EXAMPLE_CORP_IO_CX7_QSFP_A"


def test_health_recovery_defaults_to_two_seconds_and_accepts_zero() -> None:
    assert parse_config(_cfg()).health.recovery_s == 2.0
    assert parse_config(_cfg() + "health: {recoverySeconds: 0}\n").health.recovery_s == 0.0


def test_device_type_vfio_pci_binds_every_vf_to_vfio_pci_without_rdma() -> None:
    """The lifecycle's existing vfDriver binding does the work: vfio-pci is implied, and naming it is
    allowed; rdma is off (``rdma: false`` may be said too)."""
    second = f"  - resourceName: example.com/b\n{VFIO}    rdma: false\n    pfs:\n"
    cfg = parse_config(_cfg("{pfName: a, numVfs: 4}", extra=VFIO) + second
                       + "      - {pfName: b, numVfs: 2, vfDriver: vfio-pci}\n")
    for res in cfg.resources:
        assert (res.device_type, res.rdma, res.nccl_hints) == ("vfio-pci", False, False)
        assert res.pfs[0].vf_driver == "vfio-pci"
    plain = parse_config(_cfg(extra="    deviceType: netdevice\n")).resources[0]
    assert (plain.device_type, plain.rdma, plain.pfs[0].vf_driver) == ("netdevice", True, None)
    assert parse_config(_cfg()).resources[0].device_type == "netdevice"
