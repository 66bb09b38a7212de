"""`sriov-rdma-agent doctor` on the real 6.1 kernel: next to the agent serving QEMU's NVMe SR-IOV PF it
reads the netns mode over real RDMA netlink, devlink, /sys/module and the read-only /etc of the guest's
root; on the Soft-RoCE node it reads real RoCE v2 GIDs and port state, before and after a link drop."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from agentrun import RESOURCE, serving
from guestlib import read, run, wait_for

from agent.cli import main
from agent.settings import Settings


def config(pf: Path) -> str:
    # rdma: true so doctor looks at RDMA; an NVMe VF has no RDMA device, which doctor must say.
    return f"""\
resources:
  - resourceName: {RESOURCE}
    ncclHints: true
    pfs:
      - pciAddress: "{pf.name}"
        numVfs: 2
        driversAutoprobe: false
        vfDriver: pci-stub
"""


def doctor(
    s: Settings, capsys: pytest.CaptureFixture[str], text: bool = False
) -> tuple[int, dict[str, dict[str, str]]]:
    """``doctor --json`` as the CLI runs it; with ``text`` the human form also goes to the guest log."""
    args = [
        "doctor",
        "--config",
        s.config,
        "--sysfs-root",
        s.sysfs_root,
        "--dev-root",
        s.dev_root,
        "--device-plugin-dir",
        s.device_plugin_dir,
        "--devinfo-dir",
        s.devinfo_dir,
        "--pod-resources-socket",
        s.pod_resources_socket,
        "--health-address",
        s.health_address,
    ]
    if text:
        main(args)
        report = capsys.readouterr().out
        with capsys.disabled():
            print(f"\n--- sriov-rdma-agent {' '.join(args)}\n{report}--- end of doctor report")
    code = main([*args, "--json"])
    checks: dict[str, dict[str, str]] = {}
    for c in json.loads(capsys.readouterr().out)["checks"]:
        checks.setdefault(c["check"], c)
    return code, checks


def test_doctor_on_the_real_root(
    nvme_pf: Path, rxe: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    async def body() -> tuple[int, dict[str, dict[str, str]]]:
        async with serving("/", config(nvme_pf)) as served:
            await served.kubelet.wait_for(lambda: len(served.kubelet.devices(RESOURCE)) == 2, timeout=60)
            return await asyncio.to_thread(doctor, served.settings, capsys, True)

    code, c = asyncio.run(body())
    assert code == 1  # an NVMe VF has no RDMA device: a FAIL, and the right one
    assert (
        c["firmware SR-IOV"]["status"] == "PASS" and "sriov_totalvfs = 8" in c["firmware SR-IOV"]["evidence"]
    )
    assert c["numVfs"]["status"] == "PASS" and c["VF driver"]["status"] == "PASS"
    assert "bound to pci-stub" in c["VF driver"]["evidence"]
    # devlink was asked over real generic netlink; an NVMe function has no eswitch.
    assert (
        c["eswitch mode"]["status"] == "SKIP"
        and "devlink reports no eswitch" in c["eswitch mode"]["evidence"]
    )
    # The modules check reads the real /sys/module: the job loaded ib_uverbs and rdma_ucm as modules.
    assert "module)" in c["ib_uverbs"]["evidence"] and c["ib_uverbs"]["status"] == "PASS"
    assert c["rdma_ucm"]["status"] == "PASS" and "mlx5_core" not in c  # no Mellanox PF here
    # RDMA netlink answers for the real kernel and agrees with ib_core's module parameter.
    param = read(Path("/sys/module/ib_core/parameters/netns_mode"))
    mode = {"Y": "shared", "N": "exclusive"}[param]
    netns = c["netns mode"]
    assert f"netns mode: {mode} (read from RDMA netlink" in netns["evidence"], netns
    assert "but ib_core's netns_mode parameter says" not in netns["evidence"]
    r = run("rdma", "system", "show")
    if r.returncode == 0:
        assert f"netns {mode}" in r.stdout
    assert c["VF RDMA devices"]["status"] == "FAIL" and "no RDMA device" in c["VF RDMA devices"]["evidence"]
    remedy = c["VF RDMA devices"]["remedy"]
    assert "nvme" in remedy and "not an RDMA NIC driver" in remedy
    assert c["registration"]["status"] == "PASS" and c["kubelet.sock"]["status"] == "PASS"
    assert c["PodResources"]["status"] == "PASS"
    # The guest's root is the host's, shared read-only over 9p: doctor sees a read-only /etc.
    talos = c["read-only /etc"]
    assert talos["status"] == "PASS" and "/etc is read-only" in talos["evidence"]
    assert os.uname().release in talos["evidence"]


def test_doctor_reads_real_roce_gids_and_port_state(
    roce_node: tuple[Path, str, list[tuple[str, str]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, pf_addr, _ = roce_node
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""\
resources:
  - resourceName: {RESOURCE}
    ncclHints: true
    pfs:
      - pciAddress: "{pf_addr}"
        externallyManaged: true
""")
    s = Settings(
        config=str(cfg),
        sysfs_root=str(root),
        dev_root="/",
        device_plugin_dir=str(tmp_path / "dp"),
        devinfo_dir=str(tmp_path / "devinfo"),
        pod_resources_socket=str(tmp_path / "pr.sock"),
        health_address="",
    )
    _, c = doctor(s, capsys)
    assert c["RoCE v2 GID"]["status"] == "PASS" and "rxe0 port 1" in c["RoCE v2 GID"]["evidence"]
    assert c["port ACTIVE"]["status"] == "PASS" and "4: ACTIVE" in c["port ACTIVE"]["evidence"]
    # A drawn tree is not the real sysfs: what only the kernel can say is "not checked", never guessed.
    assert c["netns mode"]["status"] == "SKIP" and "not checked" in c["netns mode"]["evidence"]
    assert c["kernel modules"]["status"] == "SKIP" and "no sys/module" in c["kernel modules"]["evidence"]
    uplink = next((root / "sys/bus/pci/devices" / pf_addr / "net").iterdir()).name
    assert run("ip", "link", "set", uplink, "down").returncode == 0
    try:
        wait_for(
            lambda: read(Path("/sys/class/infiniband/rxe0/ports/1/state")) != "4: ACTIVE",
            what="rxe0 port leaves ACTIVE",
        )
        _, c = doctor(s, capsys)
        assert c["port ACTIVE"]["status"] == "FAIL" and "1: DOWN" in c["port ACTIVE"]["evidence"]
        assert c["carrier and speed"]["status"] == "FAIL"
    finally:
        run("ip", "link", "set", uplink, "up")
