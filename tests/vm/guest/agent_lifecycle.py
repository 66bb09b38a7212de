"""The agent's VF lifecycle on real PCI SR-IOV (QEMU's NVMe PF, Debian 6.1 kernel): create, resize
through 0, refuse to shrink under a VF a pod holds, restart without writing, and the ERANGE refusal."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from agentrun import RESOURCE, Served, serving, until
from guestlib import read

from agent.sim.podresources import PodDevice

TOTAL = int(os.environ.get("VM_NVME_TOTAL_VFS", "8"))


def config(pf: Path, num_vfs: int) -> str:
    # No netdev or RDMA device on an NVMe VF: rdma off; VFs come up unbound and are bound to pci-stub
    # by the agent (driver_override + drivers_probe), so no VF waits on a probe that cannot succeed.
    return f"""\
resources:
  - resourceName: {RESOURCE}
    rdma: false
    pfs:
      - pciAddress: "{pf.name}"
        numVfs: {num_vfs}
        driversAutoprobe: false
        vfDriver: pci-stub
"""


def vfs_of(pf: Path) -> list[str]:
    links = sorted(pf.glob("virtfn*"), key=lambda p: int(p.name[6:]))
    return [p.resolve().name for p in links]


def identities(pf: Path) -> dict[str, int]:
    """VF address -> inode of its sysfs directory: a VF destroyed and re-created gets a new one."""
    return {vf: os.stat(pf.parent / vf).st_ino for vf in vfs_of(pf)}


async def converged(served: Served, pf: Path, n: int) -> None:
    """Kernel and kubelet agree: n VFs, each bound to pci-stub, and the kubelet lists exactly those."""
    def done() -> bool:
        vfs = vfs_of(pf)
        return (read(pf / "sriov_numvfs") == str(n) and len(vfs) == n
                and all((pf.parent / v / "driver").resolve().name == "pci-stub" for v in vfs)
                and sorted(served.kubelet.devices(RESOURCE)) == sorted(vfs))
    await until(done, 60, f"{n} VFs bound to pci-stub and listed to the kubelet")


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_agent_creates_and_resizes_vfs_through_zero(nvme_pf: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with serving("/", config(nvme_pf, 4)) as served:
            await converged(served, nvme_pf, 4)
            for n in (6, 0, 3):  # 4 -> 6 is EBUSY for the kernel unless the agent goes through 0
                served.write_config(config(nvme_pf, n))
                await converged(served, nvme_pf, n)
            metrics = await served.metrics()
        assert not [k for k in metrics if k[0] == "sriov_rdma_reconcile_errors_total"]

    asyncio.run(body())
    assert errors(caplog) == []


def test_agent_refuses_to_shrink_under_a_held_vf(nvme_pf: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with serving("/", config(nvme_pf, 3)) as served:
            await converged(served, nvme_pf, 3)
            before = identities(nvme_pf)
            held = vfs_of(nvme_pf)[1]
            served.pods.pods = [PodDevice("ml", "nccl-0", "main", RESOURCE, (held,))]
            served.write_config(config(nvme_pf, 2))
            await until(lambda: any("would destroy VFs held by running pods" in m for m in errors(caplog)),
                        30, "the refusal")
            assert any(held in m for m in errors(caplog))
            assert read(nvme_pf / "sriov_numvfs") == "3"
            assert identities(nvme_pf) == before  # no VF was destroyed or re-created
            assert sorted(served.kubelet.devices(RESOURCE)) == sorted(before)
            metrics = await served.metrics()
            refused = {dict(labels).get("reason"): v for (name, labels), v in metrics.items()
                       if name == "sriov_rdma_reconcile_errors_total"}
            assert refused.get("vf_in_use", 0) >= 1

    asyncio.run(body())


def test_agent_restart_over_the_desired_state_writes_nothing(nvme_pf: Path) -> None:
    async def first() -> dict[str, int]:
        async with serving("/", config(nvme_pf, 4)) as served:
            await converged(served, nvme_pf, 4)
        return identities(nvme_pf)

    async def second() -> None:
        async with serving("/", config(nvme_pf, 4)) as served:
            await converged(served, nvme_pf, 4)  # the start-up reconcile runs before registration
            await asyncio.sleep(1)  # and anything it would still write has had time to land
            assert identities(nvme_pf) == created

    created = asyncio.run(first())
    assert len(created) == 4 and read(nvme_pf / "sriov_numvfs") == "4"  # SIGTERM leaves the VFs
    asyncio.run(second())


def test_agent_refuses_more_vfs_than_the_pf_has(nvme_pf: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with serving("/", config(nvme_pf, TOTAL + 1)) as served:
            await until(lambda: bool(errors(caplog)), 30, "the ERANGE refusal")
            metrics = await served.metrics()
        refused = {dict(labels).get("reason"): v for (name, labels), v in metrics.items()
                   if name == "sriov_rdma_reconcile_errors_total"}
        assert refused.get("over_totalvfs", 0) >= 1

    asyncio.run(body())
    (message,) = {m for m in errors(caplog) if "ERANGE" in m}
    assert f"numVfs {TOTAL + 1} is above sriov_totalvfs {TOTAL} (ERANGE)" in message
    assert read(nvme_pf / "sriov_numvfs") == "0"
