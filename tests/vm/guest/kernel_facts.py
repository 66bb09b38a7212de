"""What the agent relies on, checked against the real 6.1 kernel: PCI SR-IOV sysfs semantics (on QEMU's
NVMe PF), netdevsim VFs and their netlink settings, and Soft-RoCE port state, verbs device and counters."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from guestlib import read, run, set_numvfs, vf_info, wait_for, write_sysfs
from pyroute2 import IPRoute

TOTAL = int(os.environ.get("VM_NVME_TOTAL_VFS", "8"))


def virtfns(pf: Path) -> dict[str, str]:
    return {p.name: p.resolve().name for p in pf.glob("virtfn*")}


# ---------------------------------------------------------------- PCI SR-IOV (NVMe PF)
def test_nvme_pf_reports_total_vfs(nvme_pf: Path) -> None:
    assert int(read(nvme_pf / "sriov_totalvfs")) == TOTAL
    assert (nvme_pf / "driver").resolve().name == "nvme"
    assert read(nvme_pf / "sriov_numvfs") == "0"
    assert virtfns(nvme_pf) == {}


def test_nvme_numvfs_zero_to_n_creates_vfs_with_links(nvme_pf: Path) -> None:
    write_sysfs(nvme_pf / "sriov_numvfs", "4")
    assert read(nvme_pf / "sriov_numvfs") == "4"
    links = virtfns(nvme_pf)
    assert sorted(links) == ["virtfn0", "virtfn1", "virtfn2", "virtfn3"]
    for vf in links.values():
        vf_dir = nvme_pf.parent / vf
        assert (vf_dir / "physfn").resolve() == nvme_pf
        assert read(vf_dir / "class") == read(nvme_pf / "class")


def test_nvme_numvfs_n_to_m_is_ebusy_and_keeps_vfs(nvme_pf: Path) -> None:
    write_sysfs(nvme_pf / "sriov_numvfs", "2")
    with pytest.raises(OSError) as exc:
        write_sysfs(nvme_pf / "sriov_numvfs", "3")
    assert exc.value.errno == errno.EBUSY
    assert read(nvme_pf / "sriov_numvfs") == "2"
    assert len(virtfns(nvme_pf)) == 2


def test_nvme_numvfs_same_value_is_a_no_op(nvme_pf: Path) -> None:
    write_sysfs(nvme_pf / "sriov_numvfs", "2")
    before = virtfns(nvme_pf)
    write_sysfs(nvme_pf / "sriov_numvfs", "2")
    assert virtfns(nvme_pf) == before


def test_nvme_numvfs_over_total_is_erange(nvme_pf: Path) -> None:
    with pytest.raises(OSError) as exc:
        write_sysfs(nvme_pf / "sriov_numvfs", str(TOTAL + 1))
    assert exc.value.errno == errno.ERANGE
    assert read(nvme_pf / "sriov_numvfs") == "0"


def test_nvme_resize_through_zero_removes_and_recreates(nvme_pf: Path) -> None:
    set_numvfs(nvme_pf, 3)
    assert len(virtfns(nvme_pf)) == 3
    set_numvfs(nvme_pf, 0)
    assert virtfns(nvme_pf) == {}
    vf_dirs = [nvme_pf.parent / f"{nvme_pf.name[:-1]}{i}" for i in (1, 2, 3)]
    assert not any(d.exists() for d in vf_dirs)
    set_numvfs(nvme_pf, TOTAL)
    assert len(virtfns(nvme_pf)) == TOTAL


def test_nvme_recreated_vf_has_a_new_sysfs_inode(nvme_pf: Path) -> None:
    """How the VM tests tell "left alone" from "destroyed and re-created at the same address"."""
    set_numvfs(nvme_pf, 2)
    vf = nvme_pf.parent / virtfns(nvme_pf)["virtfn0"]
    before = os.stat(vf).st_ino
    write_sysfs(nvme_pf / "sriov_numvfs", "2")  # same count: a no-op
    assert os.stat(vf).st_ino == before
    set_numvfs(nvme_pf, 0)
    set_numvfs(nvme_pf, 2)
    assert os.stat(vf).st_ino != before


# ---------------------------------------------------------------- netdevsim VFs over netlink
def test_netdevsim_numvfs_shows_vfs_in_netlink(netdevsim: tuple[Path, str]) -> None:
    dev, ifname = netdevsim
    write_sysfs(dev / "sriov_numvfs", "4")
    assert read(dev / "sriov_numvfs") == "4"
    with IPRoute() as ipr:
        assert [v["vf"] for v in vf_info(ipr, ifname)] == [0, 1, 2, 3]
    with pytest.raises(OSError) as exc:
        write_sysfs(dev / "sriov_numvfs", "2")
    assert exc.value.errno == errno.EBUSY
    write_sysfs(dev / "sriov_numvfs", "0")
    with IPRoute() as ipr:
        assert vf_info(ipr, ifname) == []


def test_netdevsim_vf_settings_apply_and_read_back(netdevsim: tuple[Path, str]) -> None:
    dev, ifname = netdevsim
    write_sysfs(dev / "sriov_numvfs", "2")
    with IPRoute() as ipr:
        (idx,) = ipr.link_lookup(ifname=ifname)
        ipr.link("set", index=idx, vf={"vf": 1, "mac": "02:00:00:aa:bb:01", "trust": 1, "spoofchk": 1,
                                       "link_state": 2, "vlan": {"vlan": 100, "qos": 3},
                                       "rate": {"min_tx_rate": 0, "max_tx_rate": 1000}})
        vfs = vf_info(ipr, ifname)
    vf0, vf1 = vfs
    assert vf1["mac"] == "02:00:00:aa:bb:01"
    assert (vf1["trust"], vf1["spoofchk"], vf1["link_state"]) == (1, 1, 2)  # 2 = IFLA_VF_LINK_STATE_DISABLE
    assert (vf1["vlan"], vf1["qos"], vf1["max_tx_rate"]) == (100, 3, 1000)
    assert (vf0["trust"], vf0["vlan"], vf0["max_tx_rate"]) == (0, 0, 0)  # the other VF is untouched


def test_netdevsim_devlink_reports_eswitch_mode(netdevsim: tuple[Path, str]) -> None:
    dev, _ = netdevsim
    r = run("devlink", "dev", "eswitch", "show", f"netdevsim/{dev.name}")
    assert r.returncode == 0, r.stderr
    assert "mode legacy" in r.stdout
    r = run("devlink", "dev", "eswitch", "set", f"netdevsim/{dev.name}", "mode", "switchdev")
    assert r.returncode == 0, r.stderr
    assert "mode switchdev" in run("devlink", "dev", "eswitch", "show", f"netdevsim/{dev.name}").stdout


# ---------------------------------------------------------------- Soft-RoCE (rxe) over virtio-net
def port(dev: str, name: str) -> str:
    return read(Path("/sys/class/infiniband", dev, "ports", "1", name))


def test_rxe_port_active_with_roce_v2_gids(rxe: tuple[str, str]) -> None:
    dev, netdev = rxe
    assert port(dev, "state") == "4: ACTIVE"
    assert port(dev, "phys_state") == "5: LinkUp"
    assert port(dev, "link_layer") == "Ethernet"
    assert read(Path("/sys/class/infiniband", dev, "parent")) == netdev
    types = Path("/sys/class/infiniband", dev, "ports", "1", "gid_attrs", "types")
    assert "RoCE v2" in {t.read_text().strip() for t in types.iterdir() if _readable(t)}


def _readable(p: Path) -> bool:
    try:
        p.read_text()
    except OSError:  # unused GID slots read EINVAL
        return False
    return True


def test_rxe_port_follows_netdev_link(rxe: tuple[str, str]) -> None:
    dev, netdev = rxe
    assert run("ip", "link", "set", netdev, "down").returncode == 0
    wait_for(lambda: port(dev, "state") == "1: DOWN", what="rxe port DOWN")
    assert run("ip", "link", "set", netdev, "up").returncode == 0
    wait_for(lambda: port(dev, "state") == "4: ACTIVE", what="rxe port ACTIVE again")


def test_rxe_has_uverbs_char_device(rxe: tuple[str, str]) -> None:
    dev, _ = rxe
    verbs = [v for v in Path("/sys/class/infiniband_verbs").glob("uverbs*") if read(v / "ibdev") == dev]
    assert len(verbs) == 1
    node = Path("/dev/infiniband", verbs[0].name)
    assert stat.S_ISCHR(node.stat().st_mode)
    assert stat.S_ISCHR(Path("/dev/infiniband/rdma_cm").stat().st_mode)


def test_rxe_hw_counters_are_integers(rxe: tuple[str, str]) -> None:
    dev, _ = rxe
    counters = Path("/sys/class/infiniband", dev, "ports", "1", "hw_counters")
    values = {c.name: int(c.read_text()) for c in counters.iterdir()}
    assert {"sent_pkts", "rcvd_pkts", "link_downed"} <= values.keys()
    assert all(v >= 0 for v in values.values())
