"""`doctor` on the simulated node: each check in its passing form (the healthy DGX Spark) and in its
failing form (a variant of the node, or of the config, that breaks exactly that thing)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.core.doctor import AgentFacts, Check, NetnsFacts, NodeFacts, Status, TalosFacts, run_checks
from agent.doctor import gather
from agent.settings import Settings
from agent.sim.kernel import SimNetlink
from agent.sim.node import RDMA_MODULES, SimNode, SimPf
from tests.conftest import CX7_CONFIG, node_settings

PF = "0002:01:00.0"
HINTED = CX7_CONFIG.replace("    pfs:", "    ncclHints: true\n    pfs:")


def _settings(node: SimNode, **kw: str) -> Settings:
    return node_settings(node.root, health_address="", **kw)


def doctor(node: SimNode, config: str = HINTED, eswitch: str | None = "legacy", **kw: str) -> list[Check]:
    facts = gather(
        _settings(node, **kw),
        parse_config(config),
        real_root=False,
        eswitch=SimNetlink(node, eswitch=eswitch).eswitch_mode,
    )
    return run_checks(facts)


def one(checks: list[Check], name: str) -> Check:
    found = [c for c in checks if c.name == name]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def variant(root: Path, **kw: object) -> SimNode:
    """The DGX Spark's cabled port alone, 4 VFs, with one thing changed."""
    pf = {k: v for k, v in kw.items() if k in {f.name for f in dataclasses.fields(SimPf)}}
    node = {k: v for k, v in kw.items() if k not in pf}
    return SimNode(root=root, pfs=[SimPf(PF, "enP2p1s0f0np0", **{"numvfs": 4, **pf})], **node).build()  # type: ignore[arg-type]


@pytest.fixture
def healthy(sim_node: SimNode) -> list[Check]:
    return doctor(sim_node)


@pytest.fixture
def facts(sim_node: SimNode) -> NodeFacts:
    """The healthy node's snapshot, for states a simulated tree cannot show (dataclasses.replace)."""
    return gather(
        _settings(sim_node), parse_config(HINTED), real_root=False, eswitch=SimNetlink(sim_node).eswitch_mode
    )


# ---------------------------------------------------------------- the healthy node
def test_healthy_node_passes_every_node_check(healthy: list[Check]) -> None:
    not_ok = {(c.area, c.name, c.status) for c in healthy if c.status not in (Status.PASS, Status.SKIP)}
    # Only what needs a kubelet: no kubelet.sock and no PodResources next to a bare simulated node.
    assert not_ok == {
        ("Kubernetes", "kubelet.sock", Status.FAIL),
        ("Kubernetes", "PodResources", Status.WARN),
    }
    skipped = {c.name: c.evidence for c in healthy if c.status is Status.SKIP}
    assert set(skipped) == {"IOMMU for vfio", "registration"}  # no vfio resource; --health-address off


# ---------------------------------------------------------------- SR-IOV
def test_pf_present(healthy: list[Check], sim_node: SimNode) -> None:
    ok = one(healthy, "PF present")
    assert ok.status is Status.PASS and f"-> {PF} (enP2p1s0f0np0), driver mlx5_core" in ok.evidence
    bad = one(doctor(sim_node, HINTED.replace("enP2p1s0f0np0", "enp9s0")), "PF present")
    assert bad.status is Status.FAIL and "pfName=enp9s0: no such network interface" in bad.evidence


@pytest.mark.parametrize(
    "kw",
    [{"totalvfs": 0, "numvfs": 0}, {"sriov": False, "numvfs": 0}],
    ids=["totalvfs-0", "no-sriov-capability"],
)
def test_firmware_sriov(healthy: list[Check], sim_root: Path, kw: dict[str, object]) -> None:
    assert one(healthy, "firmware SR-IOV").status is Status.PASS
    bad = one(doctor(variant(sim_root / "n", **kw)), "firmware SR-IOV")
    assert bad.status is Status.FAIL and "firmware SR-IOV is off" in bad.evidence
    assert f"mstconfig -d {PF} -y set SRIOV_EN=1 NUM_OF_VFS=8" in bad.remedy and "reboot" in bad.remedy


def test_numvfs_within_total(healthy: list[Check], sim_node: SimNode, sim_root: Path) -> None:
    assert one(healthy, "numVfs").status is Status.PASS
    over = one(doctor(sim_node, HINTED.replace("numVfs: 4", "numVfs: 16")), "numVfs")
    assert over.status is Status.FAIL and "numVfs 16 > sriov_totalvfs 8" in over.evidence
    assert "NUM_OF_VFS=16" in over.remedy
    behind = one(doctor(variant(sim_root / "n", numvfs=0)), "numVfs")
    assert behind.status is Status.WARN and "sriov_numvfs = 0, config wants 4" in behind.evidence


def test_vf_driver(healthy: list[Check], sim_node: SimNode) -> None:
    assert one(healthy, "VF driver").status is Status.PASS
    sim_node.unprobe("0002:01:00.3")
    bad = one(doctor(sim_node), "VF driver")
    assert bad.status is Status.FAIL and "0002:01:00.3 (unbound)" in bad.evidence


def test_eswitch_legacy(healthy: list[Check], sim_node: SimNode) -> None:
    assert one(healthy, "eswitch mode").status is Status.PASS
    bad = one(doctor(sim_node, eswitch="switchdev"), "eswitch mode")
    assert bad.status is Status.FAIL and f"devlink dev eswitch set pci/{PF} mode legacy" in bad.remedy


# ---------------------------------------------------------------- IOMMU
VFIO = HINTED.replace("numVfs: 4", "numVfs: 4\n        vfDriver: vfio-pci")


def test_iommu_where_vfio_needs_it(healthy: list[Check], sim_node: SimNode, sim_root: Path) -> None:
    assert one(healthy, "IOMMU for vfio").status is Status.SKIP  # RDMA VFs on mlx5_core need none
    ok = one(doctor(sim_node, VFIO), "IOMMU for vfio")
    assert ok.status is Status.PASS and "every VF in its own IOMMU group" in ok.evidence
    bad = one(doctor(variant(sim_root / "n", iommu=False), VFIO), "IOMMU for vfio")
    assert bad.status is Status.FAIL and "no IOMMU groups at all" in bad.evidence
    assert "extraKernelArgs:\n      - intel_iommu=on\n      - iommu=pt" in bad.talos


# ---------------------------------------------------------------- modules
@pytest.mark.parametrize(
    ("module", "status"),
    [
        ("rdma_ucm", Status.FAIL),
        ("ib_uverbs", Status.FAIL),
        ("mlx5_ib", Status.FAIL),
        ("ib_umad", Status.WARN),
    ],
)
def test_modules(healthy: list[Check], sim_root: Path, module: str, status: Status) -> None:
    assert one(healthy, module).status is Status.PASS
    node = variant(sim_root / "n", modules=tuple(m for m in RDMA_MODULES if m != module))
    bad = one(doctor(node), module)
    assert bad.status is status and f"{module} is not loaded" in bad.evidence
    assert bad.talos == f"machine:\n  kernel:\n    modules:\n      - name: {module}\n"


# ---------------------------------------------------------------- RDMA
def test_vf_rdma_device_and_uverbs_node(healthy: list[Check], sim_node: SimNode, sim_root: Path) -> None:
    ok = one(healthy, "VF RDMA devices")
    assert ok.status is Status.PASS and "4 VFs with RDMA device and uverbs node" in ok.evidence
    uverbs = sim_node.rdma_name("0002:01:00.2").replace("mlx5_", "uverbs")
    (sim_node.dev / "infiniband" / uverbs).unlink()
    bad = one(doctor(sim_node), "VF RDMA devices")
    assert bad.status is Status.FAIL and f"/dev/infiniband/{uverbs} missing under --dev-root" in bad.evidence
    no_ib = one(doctor(variant(sim_root / "n", modules=("mlx5_core", "ib_core"))), "VF RDMA devices")
    assert no_ib.status is Status.FAIL and "0002:01:00.2: no RDMA device" in no_ib.evidence


def test_netns_mode(healthy: list[Check], sim_node: SimNode, sim_root: Path) -> None:
    ok = one(healthy, "netns mode")
    assert ok.status is Status.PASS and "netns mode: shared" in ok.evidence and "sriov-cni" in ok.note
    unhinted = one(doctor(sim_node, CX7_CONFIG), "netns mode")
    assert unhinted.status is Status.WARN and "set ncclHints: true on nvidia.com/cx7_qsfp" in unhinted.remedy
    assert "- name: ib_core\n        parameters:\n          - netns_mode=0" in unhinted.talos
    excl = one(doctor(variant(sim_root / "x", netns_mode="exclusive"), CX7_CONFIG), "netns mode")
    assert excl.status is Status.PASS and "exclusive" in excl.evidence and "rdma CNI" in excl.evidence
    unread = one(doctor(variant(sim_root / "u", modules=("mlx5_core",)), CX7_CONFIG), "netns mode")
    assert unread.status is Status.SKIP and "not checked: simulated --sysfs-root" in unread.evidence


def test_netns_mode_unreadable_on_the_real_kernel_fails(facts: NodeFacts) -> None:
    unread = NetnsFacts(None, "RDMA netlink socket: EPROTONOSUPPORT (ib_core is not loaded)")
    bad = one(run_checks(dataclasses.replace(facts, netns=unread, real_root=True)), "netns mode")
    assert bad.status is Status.FAIL and "ib_core is not loaded" in bad.evidence and "mlx5_ib" in bad.talos


def test_pf_roce_v2_gid(healthy: list[Check], sim_node: SimNode) -> None:
    ok = one(healthy, "RoCE v2 GID")
    assert ok.status is Status.PASS and "1 RoCE v2 GID(s) of 2" in ok.evidence
    types = sim_node.sys / "class/infiniband" / sim_node.rdma_name(PF) / "ports/1/gid_attrs/types"
    for t in types.iterdir():
        t.write_text("IB/RoCE v1\n")
    bad = one(doctor(sim_node), "RoCE v2 GID")
    assert bad.status is Status.FAIL and "no RoCE v2 GID" in bad.evidence and "enable_roce" in bad.remedy


def test_port_active_and_carrier(healthy: list[Check], sim_node: SimNode) -> None:
    assert one(healthy, "port ACTIVE").status is Status.PASS
    carrier = one(healthy, "carrier and speed")
    assert carrier.status is Status.PASS and "carrier up, 200000 Mb/s" in carrier.evidence
    sim_node.set_pf_link(PF, False)
    checks = doctor(sim_node)
    port = one(checks, "port ACTIVE")
    assert port.status is Status.FAIL and "1: DOWN, phys 3: Disabled" in port.evidence
    down = one(checks, "carrier and speed")
    assert down.status is Status.FAIL and "no carrier" in down.evidence


# ---------------------------------------------------------------- link
def test_mtu(healthy: list[Check], sim_node: SimNode) -> None:
    ok = one(healthy, "MTU")
    assert ok.status is Status.PASS and "PF 1500, VFs 1500" in ok.evidence
    vf_netdev = sim_node.vf_netdev_name(PF, 1)
    (sim_node.sys / "class/net" / vf_netdev / "mtu").write_text("9000\n")
    big = one(doctor(sim_node), "MTU")
    assert big.status is Status.WARN and f"VF MTU above the PF's 1500: {vf_netdev}=9000" in big.evidence
    cfg = one(doctor(sim_node, HINTED.replace("numVfs: 4", "numVfs: 4\n        mtu: 9000")), "MTU")
    assert "PF MTU 1500 but config mtu 9000" in cfg.evidence


# ---------------------------------------------------------------- Kubernetes (the parts that need no kubelet)
def test_devinfo_dir_writable(healthy: list[Check], sim_node: SimNode) -> None:
    assert one(healthy, "devinfo dir").status is Status.PASS
    blocker = sim_node.root / "var/run/k8s.cni.cncf.io"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("")  # a file where the directory should be
    bad = one(doctor(sim_node, devinfo_dir=str(blocker / "devinfo/dp")), "devinfo dir")
    assert bad.status is Status.FAIL and "is not a directory" in bad.evidence


def test_devinfo_files_agree_with_the_vfs(healthy: list[Check], sim_node: SimNode) -> None:
    assert one(healthy, "device-info files").status is Status.PASS
    d = Path(_settings(sim_node).devinfo_dir)
    d.mkdir(parents=True)
    vf = "0002:01:00.2"
    name = f"nvidia.com-cx7_qsfp-{vf}-device.json"
    right = sim_node.rdma_name(vf)
    (d / name).write_text(
        f'{{"type":"pci","version":"1.1.0","pci":{{"pci-address":"{vf}","rdma-device":"{right}"}}}}'
    )
    assert one(doctor(sim_node), "device-info files").status is Status.PASS
    (d / "nvidia.com-cx7_qsfp-0002:01:00.9-device.json").write_text("{}")
    assert one(doctor(sim_node), "device-info files").status is Status.WARN  # a VF that is gone
    (d / name).write_text(
        f'{{"type":"pci","version":"1.1.0","pci":{{"pci-address":"{vf}","rdma-device":"mlx5_0"}}}}'
    )
    bad = one(doctor(sim_node), "device-info files")
    assert bad.status is Status.FAIL and f"rdma-device mlx5_0, but the VF's is {right}" in bad.evidence


def test_a_vf_the_agent_advertises_without_a_devinfo_file_fails(facts: NodeFacts) -> None:
    vfs = ("0002:01:00.2", "0002:01:00.3")
    content = '{"type":"pci","version":"1.1.0","pci":{"pci-address":"0002:01:00.2"}}'
    first = {"nvidia.com-cx7_qsfp-0002:01:00.2-device.json": content}
    kube = dataclasses.replace(facts.kube, devinfo_files=first)
    agent = AgentFacts("127.0.0.1:9809", reachable=True, deviceplugin_serving=True,
                       registered={"nvidia.com/cx7_qsfp": True}, advertised={"nvidia.com/cx7_qsfp": vfs})
    bad = one(run_checks(dataclasses.replace(facts, kube=kube, agent=agent)), "device-info files")
    assert bad.status is Status.FAIL and "nvidia.com-cx7_qsfp-0002:01:00.3-device.json" in bad.evidence
    both = {**kube.devinfo_files, "nvidia.com-cx7_qsfp-0002:01:00.3-device.json": content.replace(".2", ".3")}
    good = dataclasses.replace(facts, kube=dataclasses.replace(kube, devinfo_files=both), agent=agent)
    assert one(run_checks(good), "device-info files").status is Status.PASS


def test_registration_not_serving_fails(facts: NodeFacts) -> None:
    agent = AgentFacts(
        "127.0.0.1:9809",
        reachable=True,
        deviceplugin_serving=False,
        reason="not registered with the kubelet: nvidia.com/cx7_qsfp",
    )
    bad = one(run_checks(dataclasses.replace(facts, agent=agent)), "registration")
    assert bad.status is Status.FAIL and "not registered with the kubelet" in bad.evidence


# ---------------------------------------------------------------- Talos
def test_talos_read_only_etc(healthy: list[Check], sim_node: SimNode) -> None:
    ok = one(healthy, "read-only /etc")
    assert ok.status is Status.PASS and "/etc not checked (simulated --sysfs-root" in ok.evidence
    assert "never writes under /etc" in ok.evidence
    bad = one(doctor(sim_node, devinfo_dir=str(sim_node.root / "etc/cni/devinfo")), "read-only /etc")
    assert bad.status is Status.FAIL and "--devinfo-dir" in bad.evidence


def test_talos_detected_on_the_real_root(facts: NodeFacts) -> None:
    talos = TalosFacts(
        real_root=True,
        etc_path="/etc",
        etc_read_only=True,
        kernel_release="6.12.18-talos",
        write_paths={"--devinfo-dir": "/var/run/k8s.cni.cncf.io/devinfo/dp"},
    )
    ok = one(run_checks(dataclasses.replace(facts, talos=talos)), "read-only /etc")
    assert (
        ok.status is Status.PASS
        and "/etc is read-only (as on Talos); kernel 6.12.18-talos (Talos)" in ok.evidence
    )
    elsewhere = dataclasses.replace(talos, write_paths={"--devinfo-dir": "/etc/devinfo"})
    bad = one(run_checks(dataclasses.replace(facts, talos=elsewhere)), "read-only /etc")
    assert bad.status is Status.FAIL


def test_modules_on_a_tree_without_sys_module_are_not_guessed(sim_node: SimNode) -> None:
    shutil.rmtree(sim_node.sys / "module")
    checks = doctor(sim_node)
    skip = one(checks, "kernel modules")
    assert skip.status is Status.SKIP and "no sys/module" in skip.evidence
    assert not [c for c in checks if c.area == "Modules" and c.name != "kernel modules"]
