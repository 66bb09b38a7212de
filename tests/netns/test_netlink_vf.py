"""The pyroute2 VF adapter on a real kernel: veths in a throw-away network namespace.

Real SR-IOV VFs do not exist here (the VM tier checks VF attributes against netdevsim); what the
kernel can show here is that the requests are well-formed: admin up and MTU take effect, the
RTEXT_FILTER_VF dump is read, and a VF request on a link without SR-IOV fails with the kernel's errno.
The lifecycle then runs end to end with a simulated sysfs tree whose PF netdev is a real veth.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from agent.adapters.executor import Timeouts
from agent.adapters.netlink_vf import PyrouteVfNetlink
from agent.app import App, build_agent
from agent.config import parse_config
from agent.core.reconcile import VfChange
from agent.errors import NetlinkOpError
from agent.sim.kernel import SimKernel
from agent.sim.node import SimNode, SimPf
from tests.conftest import node_settings
from tests.netns.conftest import Netns

pytestmark = pytest.mark.netns


def test_mtu_admin_up_and_vf_dump_on_a_real_link(netns: Netns) -> None:
    pf, peer = f"pf{netns.tag}", f"pp{netns.tag}"
    netns.veth(pf, peer, up=False)
    nl = PyrouteVfNetlink(netns=netns.name)
    link = nl.read_pf(pf)
    assert (link.ifname, link.admin_up, link.mtu, link.vfs) == (pf, False, 1500, ())
    nl.set_mtu(pf, 9000)
    nl.set_up(pf)
    shown = netns.ip("-o", "link", "show", pf)
    assert "mtu 9000" in shown and ",UP" in shown
    assert nl.read_pf(pf).admin_up and nl.read_pf(pf).mtu == 9000
    with pytest.raises(NetlinkOpError) as info:
        nl.set_vf(pf, 0, VfChange(trust=True))  # veth has no VFs: the kernel refuses
    assert info.value.code in (errno.EOPNOTSUPP, errno.EINVAL)
    with pytest.raises(NetlinkOpError) as missing:
        nl.read_pf("nosuch0")
    assert missing.value.code == errno.ENODEV


def test_reconcile_brings_the_real_pf_up_with_its_mtu_and_writes_nothing_twice(netns: Netns,
                                                                                sim_root: Path) -> None:
    pf_if = f"pf{netns.tag}"
    netns.veth(pf_if, f"pp{netns.tag}", up=False)
    node = SimNode(sim_root / "n", [SimPf("0000:03:00.0", pf_if, totalvfs=4)]).build()
    config = f"resources:\n  - resourceName: a.com/vf\n    pfs:\n      - pfName: {pf_if}\n" \
             "        numVfs: 2\n        mtu: 9000\n"

    def reconcile() -> App:
        agent = build_agent(node_settings(node.root), parse_config(config), writer=kernel,
                            netlink=PyrouteVfNetlink(netns=netns.name), timeouts=Timeouts(vf_wait=5))
        asyncio.run(agent.lifecycle.reconcile("test"))
        return agent

    kernel = SimKernel(node)
    agent = reconcile()
    assert agent.reporter.reconcile_status["0000:03:00.0"].state == "ok"
    shown = netns.ip("-o", "link", "show", pf_if)
    assert "mtu 9000" in shown and ",UP" in shown
    assert node.pf("0000:03:00.0").numvfs == 2
    assert agent.stats.get("reconcile_actions", pf="0000:03:00.0", action="set_link_up") == 1
    again = reconcile()
    assert again.reporter.reconcile_status["0000:03:00.0"].actions_applied == 0
    assert len(kernel.writes) == 1
