"""Lifecycle reconcile on a simulated node driven by the kernel-faithful fake (no kubelet needed)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from dataclasses import dataclass
from pathlib import Path

from agent.adapters.executor import Timeouts
from agent.app import App, build_agent
from agent.config import parse_config
from agent.core.reconcile import SetNumVfs, SetVfAttrs, VfChange, format_plan, stable_mac
from agent.services.ledger import Allocation
from agent.services.lifecycle import Lifecycle
from agent.sim.kernel import SimKernel, SimNetlink
from agent.sim.node import SimNode, dgx_spark
from agent.sim.podresources import FakePodResources, PodDevice
from tests.conftest import RESOURCE, node_settings

PF = "0002:01:00.0"
PF_IF = "enP2p1s0f0np0"


def cfg(extra: str = "numVfs: 4") -> str:
    lines = "".join(f"        {part.strip()}\n" for part in extra.split(","))
    return f"resources:\n  - resourceName: {RESOURCE}\n    pfs:\n      - pfName: {PF_IF}\n{lines}"


@dataclass
class Rig:
    node: SimNode
    kernel: SimKernel
    netlink: SimNetlink
    agent: App
    lc: Lifecycle

    def numvfs_writes(self) -> list[str]:
        return [v for p, v in self.kernel.writes if p.endswith(f"{PF}/sriov_numvfs")]

    def restart(self, config: str | None = None) -> Rig:
        """A new agent process over the same node (no state carried over)."""
        return make(self.node, config or self.agent_config, self.kernel, self.netlink)

    agent_config: str = ""


def make(node: SimNode, config: str, kernel: SimKernel | None = None,
         netlink: SimNetlink | None = None) -> Rig:
    settings = node_settings(node.root, node_name="spark-1")
    Path(settings.config).write_text(config)
    nl = netlink or SimNetlink(node)
    k = kernel or SimKernel(node, netlink=nl)
    agent = build_agent(settings, parse_config(config), writer=k, netlink=nl,
                        timeouts=Timeouts(sysfs_write=5, vf_wait=5))
    return Rig(node, k, nl, agent, agent.lifecycle, agent_config=config)


def fresh(sim_root: Path, config: str = cfg(), numvfs: int = 0) -> Rig:
    return make(dgx_spark(sim_root / "node", numvfs=numvfs), config)


def reconcile(rig: Rig, config: str | None = None) -> None:
    if config is not None:
        rig.agent.resources.config = parse_config(config)
    asyncio.run(rig.lc.reconcile("test"))


def test_zero_to_four_to_eight_goes_through_zero(sim_root: Path) -> None:
    rig = fresh(sim_root)
    reconcile(rig)
    assert rig.node.pf(PF).numvfs == 4 and rig.numvfs_writes() == ["4"]
    assert len(rig.agent.inventory.node.pfs[PF].vfs) == 4  # rescanned: the kubelet view has them
    reconcile(rig, cfg("numVfs: 8"))
    assert rig.numvfs_writes() == ["4", "0", "8"]
    assert len(list(rig.node.device_dir(PF).glob("virtfn*"))) == 8
    st = rig.agent.reporter.reconcile_status[PF]
    assert (st.state, st.desired_vfs, st.actual_vfs) == ("ok", 8, 8)
    assert (st.total_vfs, st.eswitch_mode) == (8, "legacy")
    assert rig.agent.stats.get("reconcile_actions", pf=PF, action="set_numvfs") == 3


def test_restart_over_a_node_in_desired_state_writes_nothing(sim_root: Path) -> None:
    config = cfg("numVfs: 4, mac: stable, trust: true, spoofchk: false, linkState: enable, mtu: 9000")
    rig = fresh(sim_root, config)
    reconcile(rig)
    writes, calls = len(rig.kernel.writes), len(rig.netlink.calls)
    assert writes == 1 and calls == 1 + 4  # PF MTU, then one setlink per VF
    again = rig.restart()
    reconcile(again)
    assert len(rig.kernel.writes) == writes and len(rig.netlink.calls) == calls
    assert again.agent.reporter.reconcile_status[PF].state == "ok"
    assert again.agent.reporter.reconcile_status[PF].actions_applied == 0


def test_after_a_reboot_the_vfs_are_rebuilt_from_config(sim_root: Path) -> None:
    config = cfg("numVfs: 4, mac: stable, trust: true")
    rig = fresh(sim_root, config)
    reconcile(rig)
    rig.node.remove_vfs(PF)  # reboot: the kernel comes back with sriov_numvfs = 0
    rig.netlink.forget_vfs(PF_IF)
    after = rig.restart()
    reconcile(after)
    assert rig.node.pf(PF).numvfs == 4
    vfs = rig.netlink.read_pf(PF_IF).vfs
    assert [v.mac for v in vfs] == [stable_mac("spark-1", PF, i) for i in range(4)]
    assert all(v.trust for v in vfs)


def test_refuses_to_shrink_under_a_vf_held_by_a_pod_fallback_record(sim_root: Path) -> None:
    rig = fresh(sim_root, numvfs=4)
    rig.agent.ledger.records["0002:01:00.3"] = Allocation("0002:01:00.3", RESOURCE, time.time())
    reconcile(rig, cfg("numVfs: 2"))
    assert rig.numvfs_writes() == [] and rig.node.pf(PF).numvfs == 4
    st = rig.agent.reporter.reconcile_status[PF]
    assert (st.state, st.reason) == ("refused", "vf_in_use") and "0002:01:00.3" in st.message
    assert rig.agent.stats.get("reconcile_errors", pf=PF, reason="vf_in_use") == 1


def test_podresources_decides_which_vfs_are_held(sim_root: Path) -> None:
    rig = fresh(sim_root, numvfs=4)
    pods = FakePodResources(rig.agent.settings.pod_resources_socket)

    async def body() -> None:
        await pods.start()
        try:
            pods.pods = [PodDevice("ml", "nccl-0", "main", RESOURCE, ("0002:01:00.5",))]
            rig.agent.resources.config = parse_config(cfg("numVfs: 8"))
            await rig.lc.reconcile("test")
            st = rig.agent.reporter.reconcile_status[PF]
            assert (st.state, st.reason) == ("refused", "vf_in_use") and "0002:01:00.5" in st.message
            assert rig.node.pf(PF).numvfs == 4 and pods.calls >= 1
            pods.pods = []  # the pod finished
            await rig.lc.reconcile("test")
            assert rig.node.pf(PF).numvfs == 8 and rig.agent.reporter.reconcile_status[PF].state == "ok"
        finally:
            await pods.stop()
    asyncio.run(body())


def test_enomem_is_reported_with_the_realloc_hint_and_retried(sim_root: Path) -> None:
    rig = fresh(sim_root)
    rig.kernel.inject(PF, "sriov_numvfs", errno.ENOMEM)
    reconcile(rig)
    st = rig.agent.reporter.reconcile_status[PF]
    assert (st.state, st.reason) == ("error", "pci_resources") and "pci=realloc" in st.message
    assert rig.agent.stats.get("reconcile_errors", pf=PF, reason="pci_resources") == 1
    reconcile(rig)
    assert rig.node.pf(PF).numvfs == 4 and rig.agent.reporter.reconcile_status[PF].state == "ok"


def test_numvfs_over_the_firmware_limit_is_refused_before_any_write(sim_root: Path) -> None:
    rig = fresh(sim_root, cfg("numVfs: 16"))
    reconcile(rig)
    st = rig.agent.reporter.reconcile_status[PF]
    assert (st.state, st.reason) == ("refused", "over_totalvfs")
    assert "NUM_OF_VFS=16" in st.message and "reboot" in st.message
    assert rig.kernel.writes == []


def test_externally_managed_pf_is_only_checked(sim_root: Path) -> None:
    rig = fresh(sim_root, cfg("numVfs: 4, externallyManaged: true, trust: true"), numvfs=2)
    reconcile(rig)
    assert rig.kernel.writes == [] and rig.netlink.calls == []
    st = rig.agent.reporter.reconcile_status[PF]
    assert (st.state, st.reason) == ("external", "externally_managed_mismatch")


def test_unknown_pf_is_reported_and_the_others_reconciled(sim_root: Path) -> None:
    config = cfg() + "      - pfName: ens9f9np0\n        numVfs: 2\n"
    rig = fresh(sim_root, config)
    reconcile(rig)
    assert rig.node.pf(PF).numvfs == 4
    missing = rig.agent.reporter.reconcile_status["pfName=ens9f9np0"]
    assert (missing.state, missing.reason) == ("not_found", "pf_not_found")


def test_pf_admin_down_is_brought_up(sim_root: Path) -> None:
    rig = fresh(sim_root, numvfs=4)
    rig.netlink.set_down(PF_IF)
    reconcile(rig)
    assert rig.netlink.admin_up(PF_IF) and ("set_up", PF_IF, True) in rig.netlink.calls


def test_dry_run_prints_the_plan_and_changes_nothing(sim_root: Path) -> None:
    rig = fresh(sim_root, cfg("numVfs: 8"), numvfs=4)
    actions = asyncio.run(rig.lc.dry_run())
    assert actions[:2] == (SetNumVfs(PF, 0), SetNumVfs(PF, 8))
    text = format_plan(actions)
    assert "write 0 to sriov_numvfs" in text and "write 8 to sriov_numvfs" in text
    assert rig.kernel.writes == [] and rig.node.pf(PF).numvfs == 4
    settled = fresh(sim_root / "b", cfg("numVfs: 4, trust: true"), numvfs=4)
    acts = asyncio.run(settled.lc.dry_run())
    assert all(isinstance(a, SetVfAttrs) for a in acts) and len(acts) == 4
    assert "nothing to change" in format_plan(())


class _IgnoringNetlink(SimNetlink):
    """A driver that accepts VF attribute changes and silently keeps the old values."""

    def set_vf(self, ifname: str, vf: int, change: VfChange) -> None:
        self.calls.append(("set_vf", ifname, (vf, change)))


class _BrokenNetlink(SimNetlink):
    def eswitch_mode(self, pci_address: str) -> str | None:
        raise RuntimeError("a bug, not a kernel error")


def test_a_pf_that_never_converges_is_reported_not_retried_forever(sim_root: Path) -> None:
    node = dgx_spark(sim_root / "node", numvfs=2)
    rig = make(node, cfg("numVfs: 2, trust: true"), netlink=_IgnoringNetlink(node))
    reconcile(rig)
    st = rig.agent.reporter.reconcile_status[PF]
    assert (st.state, st.reason) == ("error", "not_converged") and "trust=True" in st.message
    assert len(rig.netlink.calls) == 2 * rig.lc.max_rounds  # bounded: max_rounds rounds of 2 VFs


def test_an_unexpected_failure_is_logged_counted_and_retried_and_serving_goes_on(sim_root: Path) -> None:
    node = dgx_spark(sim_root / "node", numvfs=0)
    rig = make(node, cfg(), netlink=_BrokenNetlink(node))

    async def body() -> None:
        task = asyncio.create_task(rig.lc.guarded("test"))
        while rig.agent.stats.get("callback_errors", callback="reconcile") < 3:  # retried with backoff
            await asyncio.sleep(0.05)
        assert not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    asyncio.run(asyncio.wait_for(body(), 30))
