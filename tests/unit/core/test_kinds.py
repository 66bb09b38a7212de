"""Device kinds without a kernel: VFs bound to vfio-pci on the simulated node (through the kernel's own
driver_override + drivers_probe), read by discovery, judged by the vfio-pci kind, allocated as the
community plugin's vfio info provider answers; and the netdevice kind unchanged beside it."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from agent.adapters.sysfs import SysfsHost
from agent.config import parse_config
from agent.core.inventory import NodeState, allocate, build_view, devinfo_file_name
from agent.core.kinds import Netdevice, Vfio, kind_of
from agent.errors import AllocationError, SysfsError
from agent.model import Health, IommuGroup, PfInfo, ResourceView
from agent.sim.kernel import SimKernel
from agent.sim.node import SimNode, dgx_spark

PF = "0002:01:00.0"
PF_NAME = "enP2p1s0f0np0"
RESOURCE = "example.com/dpdk"
ENV = "PCIDEVICE_EXAMPLE_COM_DPDK"
VFIO = parse_config(f"""\
resources:
  - resourceName: {RESOURCE}
    deviceType: vfio-pci
    pfs:
      - pfName: {PF_NAME}
        numVfs: 4
""").resources[0]


def bind_vfio(node: SimNode, vfs: list[str]) -> SimKernel:
    """What the agent's BindVfDriver writes, in its order, handled as the kernel does."""
    kernel = SimKernel(node)
    for vf in vfs:
        kernel.rebind(vf, "vfio-pci")
    return kernel


def vfs_of(node: SimNode) -> list[str]:
    return [node.vf_address(PF, i) for i in range(node.pf(PF).numvfs)]


def state(node: SimNode) -> tuple[PfInfo, ResourceView, NodeState, SysfsHost]:
    host = SysfsHost(node.root)
    pf = host.read_pf(PF)
    return pf, build_view(VFIO, [pf], (), host.dev_path_exists), NodeState({PF: pf}), host


def group_of(node: SimNode, vf: str) -> str:
    return os.readlink(node.device_dir(vf) / "iommu_group").rsplit("/", 1)[-1]


def test_binding_to_vfio_pci_makes_the_group_node_and_unbinding_removes_it(sim_root: Path) -> None:
    node = dgx_spark(sim_root / "node")
    vf = vfs_of(node)[0]
    group = group_of(node, vf)
    assert (node.dev / "vfio/vfio").exists() and not (node.dev / "vfio" / group).exists()
    kernel = bind_vfio(node, [vf])
    assert os.readlink(node.device_dir(vf) / "driver").endswith("/vfio-pci")
    assert not (node.device_dir(vf) / "net").exists()  # mlx5_core let go: netdev and RDMA device gone
    assert (node.dev / "vfio" / group).exists()
    assert (node.sys / "kernel/iommu_groups" / group / "devices" / vf).resolve() == node.device_dir(vf)
    assert SysfsHost(node.root).read_vf(vf, 0, PF).iommu_group == IommuGroup(group)
    kernel.store(node.sys / "bus/pci/drivers/vfio-pci/unbind", vf)
    assert not (node.dev / "vfio" / group).exists()
    assert (node.device_dir(vf) / "iommu_group").is_symlink()  # a real IOMMU group stays


def test_vfio_kind_serves_bound_vfs_healthy_and_allocates_as_the_community_plugin(sim_root: Path) -> None:
    node = dgx_spark(sim_root / "node")
    vfs = vfs_of(node)
    bind_vfio(node, vfs)
    _, view, nodestate, host = state(node)
    assert [(d.id, d.health, d.numa_node) for d in view.devices] == [(v, Health.HEALTHY, 0) for v in vfs]
    a, b = vfs[3], vfs[1]
    ga, gb = group_of(node, a), group_of(node, b)
    out = allocate(VFIO, [a, b], view, nodestate, host.dev_path_exists)
    assert out.envs[ENV] == f"{a},{b}"
    assert json.loads(out.envs[ENV + "_INFO"]) == {
        a: {"generic": {"deviceID": a}, "vfio": {"dev-mount": f"/dev/vfio/{ga}", "mount": "/dev/vfio/vfio"}},
        b: {"generic": {"deviceID": b}, "vfio": {"dev-mount": f"/dev/vfio/{gb}", "mount": "/dev/vfio/vfio"}},
    }
    # The container node once, then each VF's group in request order; all rw, host path = container path.
    assert [(d.host_path, d.container_path, d.permissions) for d in out.devices] == [
        ("/dev/vfio/vfio", "/dev/vfio/vfio", "rw"), (f"/dev/vfio/{ga}", f"/dev/vfio/{ga}", "rw"),
        (f"/dev/vfio/{gb}", f"/dev/vfio/{gb}", "rw")]
    assert all(host.dev_path_exists(d.host_path) for d in out.devices)
    assert out.devinfo == {devinfo_file_name(RESOURCE, v): (
        f'{{"type":"pci","version":"1.1.0","pci":{{"pci-address":"{v}"}}}}') for v in (a, b)}


def test_no_iommu_mode_makes_up_a_group_and_hands_its_node_over_as_dev_vfio_n(sim_root: Path) -> None:
    """vfio.enable_unsafe_noiommu_mode=1 on a node without an IOMMU: the kernel makes up a group named
    vfio-noiommu; the host node is /dev/vfio/noiommu-<n>, the container sees /dev/vfio/<n>."""
    node = dgx_spark(sim_root / "node", iommu=False, vfio_noiommu=True)
    vf = vfs_of(node)[0]
    assert not (node.device_dir(vf) / "iommu_group").exists()
    kernel = bind_vfio(node, [vf])
    group = group_of(node, vf)
    assert (node.sys / "kernel/iommu_groups" / group / "name").read_text() == "vfio-noiommu\n"
    assert (node.dev / "vfio" / f"noiommu-{group}").exists()
    _, view, nodestate, host = state(node)
    assert view.by_id()[vf].health is Health.HEALTHY
    out = allocate(VFIO, [vf], view, nodestate, host.dev_path_exists)
    assert [(d.host_path, d.container_path) for d in out.devices] == [
        ("/dev/vfio/vfio", "/dev/vfio/vfio"), (f"/dev/vfio/noiommu-{group}", f"/dev/vfio/{group}")]
    assert json.loads(out.envs[ENV + "_INFO"])[vf]["vfio"]["dev-mount"] == f"/dev/vfio/{group}"
    kernel.store(node.sys / "bus/pci/drivers/vfio-pci/unbind", vf)  # the made-up group goes with it
    assert not (node.device_dir(vf) / "iommu_group").exists()
    assert not (node.sys / "kernel/iommu_groups" / group).exists()
    assert not (node.dev / "vfio" / f"noiommu-{group}").exists()


def test_without_an_iommu_vfio_pci_refuses_the_vf_and_the_kind_says_why(sim_root: Path) -> None:
    node = dgx_spark(sim_root / "node", iommu=False)
    vf = vfs_of(node)[0]
    kernel = bind_vfio(node, [vf])  # drivers_probe succeeds; the probe does not
    assert not (node.device_dir(vf) / "driver").exists()
    assert any("probe failed with error -22" in line for line in kernel.kernel_log)
    with pytest.raises(SysfsError) as info:
        kernel.write(node.sys / "bus/pci/drivers/vfio-pci/bind", vf)
    assert info.value.errno == errno.EINVAL
    _, view, *_ = state(node)
    assert view.by_id()[vf].reason == "VF is not bound to a driver, not vfio-pci"


def test_vfio_health_reasons(sim_root: Path) -> None:
    node = dgx_spark(sim_root / "node")
    vfs = vfs_of(node)
    bind_vfio(node, vfs[1:])
    (node.dev / "vfio" / group_of(node, vfs[2])).unlink()  # --dev-root without the host's /dev/vfio
    _, view, nodestate, host = state(node)
    reasons = {d.id: d.reason for d in view.devices}
    assert reasons == {vfs[0]: "VF is bound to mlx5_core, not vfio-pci", vfs[1]: "",
                       vfs[2]: f"/dev/vfio/{group_of(node, vfs[2])} does not exist", vfs[3]: ""}
    with pytest.raises(AllocationError, match="unhealthy: VF is bound to mlx5_core"):
        allocate(VFIO, [vfs[0]], view, nodestate, host.dev_path_exists)
    node.set_pf_link(PF_NAME, up=False)  # the PF's link is the VFs' uplink
    _, view, *_ = state(node)
    assert {d.reason for d in view.devices if d.id != vfs[0]} == {
        f"PF {PF_NAME} has no carrier", f"/dev/vfio/{group_of(node, vfs[2])} does not exist"}


def test_a_pf_without_a_netdev_has_no_link_to_judge(sim_root: Path) -> None:
    """An NVMe controller or an accelerator: its VFs are judged by driver, group and node alone."""
    node = dgx_spark(sim_root / "node")
    vfs = vfs_of(node)
    bind_vfio(node, vfs)
    pf, _, _, host = state(node)
    no_netdev = PfInfo(**{**pf.__dict__, "netdev": None})
    view = build_view(VFIO, [no_netdev], (), host.dev_path_exists)
    assert {d.health for d in view.devices} == {Health.HEALTHY}
    no_driver = PfInfo(**{**pf.__dict__, "driver": None})
    view = build_view(VFIO, [no_driver], (), host.dev_path_exists)
    assert {d.reason for d in view.devices} == {"PF has no driver bound"}


def test_kind_of_follows_device_type_and_rdma(sim_root: Path) -> None:
    base = f"resources: [{{resourceName: {RESOURCE}, pfs: [{{pfName: {PF_NAME}, numVfs: 4}}]"
    assert kind_of(parse_config(base + "}]").resources[0]) == Netdevice(rdma=True)
    assert kind_of(parse_config(base + ", rdma: false}]").resources[0]) == Netdevice(rdma=False)
    assert kind_of(parse_config(base + ", deviceType: netdevice}]").resources[0]) == Netdevice(rdma=True)
    assert kind_of(VFIO) == Vfio()
