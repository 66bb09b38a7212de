"""The agent's VF settings (MAC, trust, spoofchk, link state, VLAN/QoS, rate) applied over real
rtnetlink to netdevsim's VFs and read back from the kernel, then changed by a config reload."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agentrun import RESOURCE, serving, until
from guestlib import pci_function_of, stitched_node, uplink, vf_info, write_sysfs
from pyroute2 import IPRoute

from agent.core.reconcile import stable_mac

PF_ADDR = "0000:7f:00.0"  # free on the VM's buses; the netdevsim "PF" is drawn at this address
NODE = "vm-node"  # agentrun's --node-name: seeds the stable MACs


def config(vlan: int) -> str:
    return f"""\
resources:
  - resourceName: {RESOURCE}
    rdma: false
    pfs:
      - pciAddress: "{PF_ADDR}"
        numVfs: 3
        mac: stable
        trust: true
        spoofchk: false
        linkState: enable
        vlan: {vlan}
        qos: 2
        maxTxRate: 1000
"""


def test_agent_applies_vf_settings_on_netdevsim(netdevsim: tuple[Path, str], tmp_path: Path) -> None:
    dev, ifname = netdevsim
    write_sysfs(dev / "sriov_numvfs", "3")  # the count is already right: the agent only sets VF attributes
    root = tmp_path / "node"
    stitched_node(root, PF_ADDR, pci_function_of(uplink()), (ifname, None), [(None, None)] * 3,
                  numvfs_from=dev / "sriov_numvfs")

    def kernel_vfs() -> list[dict[str, object]]:
        with IPRoute() as ipr:
            return vf_info(ipr, ifname)

    def applied(vlan: int) -> bool:
        return all(v["trust"] == 1 and v["spoofchk"] == 0 and v["link_state"] == 1 and v["vlan"] == vlan
                   and v["qos"] == 2 and v["max_tx_rate"] == 1000
                   and v["mac"] == stable_mac(NODE, PF_ADDR, int(str(v["vf"])))
                   for v in kernel_vfs())

    async def body() -> None:
        async with serving(root, config(vlan=100)) as served:  # the lifecycle writes through the links
            await served.kubelet.wait_for(lambda: len(served.kubelet.devices(RESOURCE)) == 3, timeout=30)
            await until(lambda: applied(100), 30, "VF settings in the kernel")
            served.write_config(config(vlan=200))
            await until(lambda: applied(200), 30, "the new VLAN in the kernel")

    asyncio.run(body())
    macs = [v["mac"] for v in kernel_vfs()]
    assert len(set(macs)) == 3  # one per VF
    assert all(int(str(m)[:2], 16) & 0x02 for m in macs)  # locally administered
