"""The vfio-pci device kind on a real kernel: the agent, configured with ``deviceType: vfio-pci``, binds
the emulated NVMe PF's VFs to vfio-pci (its own driver_override + drivers_probe, the vfDriver path) and
Allocate hands out the group nodes the kernel made. The VM has an IOMMU (QEMU's intel-iommu, the guest
booted with intel_iommu=on; see tests/vm/vmharness.py), so each VF sits in a real IOMMU group and its
node is /dev/vfio/<group>, as on a bare-metal node."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

from agent_lifecycle import vfs_of
from agentrun import RESOURCE, serving, until

ENV = "PCIDEVICE_NVIDIA_COM_CX7_QSFP"


def config(pf: Path, num_vfs: int) -> str:
    # NVMe VFs fail the nvme driver's probe (no queues assigned): created unbound, then bound by the agent.
    return f"""\
resources:
  - resourceName: {RESOURCE}
    deviceType: vfio-pci
    pfs:
      - pciAddress: "{pf.name}"
        numVfs: {num_vfs}
        driversAutoprobe: false
"""


def group_of(vf: str) -> str:
    return os.readlink(f"/sys/bus/pci/devices/{vf}/iommu_group").rsplit("/", 1)[-1]


def is_char_device(path: str) -> bool:
    return stat.S_ISCHR(os.stat(path).st_mode)


def test_the_guest_has_an_iommu_and_vfio() -> None:
    """The premise: QEMU's VT-d is on (a DMAR unit, IOMMU groups). Debian's kernel is built without
    vfio's no-IOMMU mode (vfio has no enable_unsafe_noiommu_mode parameter), so a real IOMMU is the
    only way vfio-pci takes a device here."""
    assert "dmar0" in os.listdir("/sys/class/iommu"), "no DMAR unit: was the VM started with intel-iommu?"
    assert os.listdir("/sys/kernel/iommu_groups")
    assert not Path("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode").exists()
    assert is_char_device("/dev/vfio/vfio")


def test_agent_binds_vfs_to_vfio_pci_and_allocates_their_real_group_nodes(nvme_pf: Path) -> None:
    async def body() -> None:
        async with serving("/", config(nvme_pf, 2)) as served:
            def done() -> bool:
                vfs = vfs_of(nvme_pf)
                return (len(vfs) == 2
                        and all((nvme_pf.parent / v / "driver").resolve().name == "vfio-pci" for v in vfs)
                        and served.kubelet.healthy(RESOURCE) == sorted(vfs))
            await until(done, 60, "2 VFs bound to vfio-pci and listed Healthy")
            vfs = vfs_of(nvme_pf)
            groups = {vf: group_of(vf) for vf in vfs}
            assert len(set(groups.values())) == 2, groups  # ACS: each VF in its own group
            for group in groups.values():
                assert not Path(f"/sys/kernel/iommu_groups/{group}/name").exists()  # a real group
                assert is_char_device(f"/dev/vfio/{group}")
            resp = await served.kubelet.allocate(RESOURCE, [vfs[1], vfs[0]])
            want = [f"/dev/vfio/{groups[vfs[1]]}", f"/dev/vfio/{groups[vfs[0]]}"]
            assert [(d.host_path, d.container_path, d.permissions) for d in resp.devices] == [
                ("/dev/vfio/vfio", "/dev/vfio/vfio", "rw"), *((p, p, "rw") for p in want)]
            assert all(is_char_device(d.host_path) for d in resp.devices)
            assert resp.envs[ENV] == f"{vfs[1]},{vfs[0]}"
            assert json.loads(resp.envs[ENV + "_INFO"]) == {
                vf: {"generic": {"deviceID": vf},
                     "vfio": {"dev-mount": f"/dev/vfio/{groups[vf]}", "mount": "/dev/vfio/vfio"}}
                for vf in vfs}
            devinfo = Path(served.settings.devinfo_dir) / f"nvidia.com-cx7_qsfp-{vfs[0]}-device.json"
            assert json.loads(devinfo.read_text()) == {"type": "pci", "version": "1.1.0",
                                                       "pci": {"pci-address": vfs[0]}}

    asyncio.run(body())
