"""The executor against the kernel-faithful fake: errno mapping, late VFs, hung writes."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from agent.adapters.executor import Executor, Timeouts, error_reason
from agent.adapters.sysfs import SysfsHost
from agent.core.reconcile import BindVfDriver, SetNumVfs, WaitForVfs
from agent.errors import OperationTimeoutError, SysfsError
from agent.sim.kernel import SimKernel, SimNetlink
from agent.sim.node import SimNode, SimPf

PF = "0000:03:00.0"


def setup(root: Path, timeouts: Timeouts | None = None,
          **kernel: float) -> tuple[SimNode, SimKernel, Executor]:
    node = SimNode(root, [SimPf(PF, "ens3f0np0", totalvfs=8)]).build()
    k = SimKernel(node, **kernel)
    return node, k, Executor(SysfsHost(root, writer=k), SimNetlink(node), timeouts)


async def _apply_err(ex: Executor, action: SetNumVfs) -> SysfsError:
    with pytest.raises(SysfsError) as info:
        await ex.apply(action)
    return info.value


def test_kernel_errors_become_reasons_with_hints(sim_root: Path) -> None:
    node, k, ex = setup(sim_root)

    async def body() -> None:
        await ex.apply(SetNumVfs(PF, 4))
        busy = await _apply_err(ex, SetNumVfs(PF, 8))
        assert busy.errno == errno.EBUSY and error_reason(busy)[0] == "vfs_busy"
        over = await _apply_err(ex, SetNumVfs(PF, 9))
        assert over.errno == errno.ERANGE and "mstconfig" in error_reason(over)[1]
        await ex.apply(SetNumVfs(PF, 0))
        k.inject(PF, "sriov_numvfs", errno.ENOMEM)
        nomem = await _apply_err(ex, SetNumVfs(PF, 4))
        assert error_reason(nomem)[0] == "pci_resources" and "pci=realloc" in error_reason(nomem)[1]
        node.unprobe(PF)  # the PF loses its driver
        nodrv = await _apply_err(ex, SetNumVfs(PF, 4))
        assert nodrv.errno == errno.ENOENT and error_reason(nodrv)[0] == "no_pf_driver"
    asyncio.run(body())


def test_waits_for_vfs_that_appear_late_with_backoff(sim_root: Path) -> None:
    node, _k, ex = setup(sim_root, vf_delay=0.1, probe_delay=0.2)

    async def body() -> None:
        await ex.apply(SetNumVfs(PF, 3))
        assert not list(node.device_dir(PF).glob("virtfn*"))
        await ex.apply(WaitForVfs(PF, 3, probed=True))
        for i in range(3):
            assert (node.device_dir(node.vf_address(PF, i)) / "net").is_dir()
    asyncio.run(body())


def test_wait_gives_up_and_says_what_is_missing(sim_root: Path) -> None:
    _node, _k, ex = setup(sim_root, Timeouts(vf_wait=0.2), vf_delay=0.05, probe_delay=30)

    async def body() -> None:
        await ex.apply(SetNumVfs(PF, 2))
        with pytest.raises(OperationTimeoutError) as info:
            await ex.apply(WaitForVfs(PF, 2, probed=True))
        assert "not bound to a driver yet" in str(info.value)
        assert error_reason(info.value)[0] == "timeout"
    asyncio.run(body())


def test_hung_write_times_out_while_the_loop_keeps_running(sim_root: Path) -> None:
    _node, k, ex = setup(sim_root, Timeouts(sysfs_write=0.3))
    hang = k.hang_next("sriov_numvfs")

    async def body() -> None:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        with pytest.raises(OperationTimeoutError) as info:
            await ex.apply(SetNumVfs(PF, 2))
        assert error_reason(info.value)[0] == "write_hung"
        assert ticks > 5  # the event loop ran other work during the hung write
        assert ex.hung(PF) is not None
        # While the kernel write is stuck, no second write is stacked on the same PF.
        with pytest.raises(OperationTimeoutError, match="still hung"):
            await ex.apply(SetNumVfs(PF, 0))
        assert k.count("sriov_numvfs") == 1
        hang.release.set()
        for _ in range(500):  # the kernel write finishes on its own thread
            if ex.hung(PF) is None:
                break
            await asyncio.sleep(0.01)
        assert ex.hung(PF) is None
        await ex.apply(WaitForVfs(PF, 2, probed=True))  # the write did complete in the end
        t.cancel()
    asyncio.run(body())


def test_bind_vf_driver_through_driver_override_and_drivers_probe(sim_root: Path) -> None:
    node, k, ex = setup(sim_root)

    async def body() -> None:
        await ex.apply(SetNumVfs(PF, 1))
        vf = node.vf_address(PF, 0)
        await ex.apply(BindVfDriver(PF, 0, vf, "vfio-pci", "mlx5_core"))
        assert os.readlink(node.device_dir(vf) / "driver").endswith("/vfio-pci")
        assert [p for p, _ in k.writes[-3:]] == [
            "bus/pci/drivers/mlx5_core/unbind", f"bus/pci/devices/{vf}/driver_override",
            "bus/pci/drivers_probe"]
        with pytest.raises(SysfsError, match="bound to no driver, not no-such-driver"):
            await ex.apply(BindVfDriver(PF, 0, vf, "no-such-driver", "vfio-pci"))
    asyncio.run(body())
