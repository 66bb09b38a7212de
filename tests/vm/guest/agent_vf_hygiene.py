"""VF hygiene on a real kernel: a VF its pod released is put back to the netlink baseline (netdevsim
VFs, real rtnetlink) and reset through its sysfs ``reset`` (the emulated NVMe PF's VFs, a real FLR),
then offered to the kubelet stand-in again."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest
from agent_lifecycle import converged, vfs_of
from agentrun import RESOURCE, Served, serving, until
from guestlib import pci_function_of, stitched_node, uplink, vf_info, write_sysfs
from pyroute2 import IPRoute

from agent.core.reconcile import stable_mac
from agent.sim.podresources import PodDevice

PF_ADDR = "0000:7f:00.0"  # free on the VM's buses; the netdevsim "PF" is drawn at this address
VF1 = "0000:7f:00.2"  # stitched_node: VF i at function i + 1
NODE = "vm-node"  # agentrun's --node-name


async def hold_then_release(served: Served, vf: str, dirty: object = None, allocate: bool = True) -> None:
    """A pod gets the VF, the kubelet lists it (a scrape asks PodResources), the pod goes away."""
    if allocate:
        await served.kubelet.allocate(RESOURCE, [vf])
    served.pods.pods = [PodDevice("ml", "nccl-0", "main", RESOURCE, (vf,))]
    await served.metrics()  # PodResources is asked: the allocation is confirmed
    if callable(dirty):
        await asyncio.to_thread(dirty)
    served.pods.pods = []
    await served.metrics()  # asked again: the release


def resets(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    return {dict(labels)["outcome"]: v for (name, labels), v in metrics.items()
            if name == "sriov_rdma_vf_resets_total"}


def test_released_netdevsim_vf_gets_the_netlink_baseline_back(netdevsim: tuple[Path, str],
                                                              tmp_path: Path) -> None:
    dev, ifname = netdevsim
    write_sysfs(dev / "sriov_numvfs", "3")
    root = tmp_path / "node"
    stitched_node(root, PF_ADDR, pci_function_of(uplink()), (ifname, None), [(None, None)] * 3,
                  numvfs_from=dev / "sriov_numvfs")
    config = f"""\
resources:
  - resourceName: {RESOURCE}
    rdma: false
    pfs:
      - pciAddress: "{PF_ADDR}"
        numVfs: 3
        mac: stable
        spoofchk: true
"""

    def vf1() -> dict[str, object]:
        with IPRoute() as ipr:
            return vf_info(ipr, ifname)[1]

    def dirty() -> None:  # what a pod's sriov-cni left behind
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=idx, vf={"vf": 1, "mac": "02:00:00:00:00:42",
                                           "vlan": {"vlan": 42, "qos": 3}, "trust": 1, "spoofchk": 0,
                                           "link_state": 2, "rate": {"min_tx_rate": 0, "max_tx_rate": 500}})

    def baseline() -> bool:
        v = vf1()
        return (v["mac"] == stable_mac(NODE, PF_ADDR, 1) and (v["vlan"], v["qos"]) == (0, 0)
                and v["trust"] == 0 and v["spoofchk"] == 1 and v["link_state"] == 0
                and (v["min_tx_rate"], v["max_tx_rate"]) == (0, 0))

    async def body() -> None:
        async with serving(root, config) as served:
            await served.kubelet.wait_for(lambda: served.health().get(VF1) == "Healthy", timeout=30)
            await hold_then_release(served, VF1, dirty)
            # These VFs have no netdev, so no event marks the release: scrapes see it (each asks the
            # ledger, through the 2 s PodResources cache), as VictoriaMetrics' would.
            async with asyncio.timeout(30):
                while not resets(await served.metrics()):
                    await asyncio.sleep(0.2)
            await until(baseline, 30, "the baseline VF attributes in the kernel")
            await served.kubelet.wait_for(lambda: served.health().get(VF1) == "Healthy", timeout=30)
            assert resets(await served.metrics()).get("ok") == 1

    asyncio.run(body())


def test_nvme_vf_reset_attribute_is_the_kernels_flr(nvme_pf: Path) -> None:
    """The facts the simulated kernel's ``reset`` follows: "1" resets, any other number is EINVAL."""
    write_sysfs(nvme_pf / "sriov_numvfs", "1")
    vf = (nvme_pf / "virtfn0").resolve()
    write_sysfs(vf / "reset", "1")
    with pytest.raises(OSError) as err:
        write_sysfs(vf / "reset", "2")
    assert err.value.errno == errno.EINVAL


def test_released_nvme_vf_is_reset_through_sysfs(nvme_pf: Path) -> None:
    config = f"""\
resources:
  - resourceName: {RESOURCE}
    rdma: false
    pfs:
      - pciAddress: "{nvme_pf.name}"
        numVfs: 2
        driversAutoprobe: false
        vfDriver: pci-stub
        resetOnRelease: flr
"""

    async def body() -> None:
        async with serving("/", config) as served:
            await converged(served, nvme_pf, 2)
            vf = vfs_of(nvme_pf)[1]
            # An NVMe PF has no netdev, so its VFs are never Healthy for an RDMA resource and the kubelet
            # stand-in cannot Allocate one: the pod is PodResources listing the VF, then not.
            await hold_then_release(served, vf, allocate=False)
            async with asyncio.timeout(30):
                while not (counts := resets(await served.metrics())):
                    await asyncio.sleep(0.1)
            assert counts == {"ok": 1}, counts  # the FLR was written and the kernel accepted it

    asyncio.run(body())
