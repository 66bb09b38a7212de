"""The running agent manages VFs on a simulated node: the kubelet stand-in sees them appear and change,
the ConfigMap is swapped as the kubelet does it (atomic ``..data`` symlink), and a hung kernel write
never stops ListAndWatch or Allocate."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from agent.adapters.executor import Timeouts
from agent.app import App, build_agent
from agent.config import parse_config
from agent.model import PfReconcileStatus
from agent.services.lifecycle import Lifecycle
from agent.settings import Settings
from agent.sim.kernel import SimKernel, SimNetlink
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import SimNode, dgx_spark
from agent.sim.podresources import FakePodResources, PodDevice
from tests.conftest import RESOURCE, node_settings

PF = "0002:01:00.0"


def config(numvfs: int | str, selector: str = "pfName: enP2p1s0f0np0") -> str:
    return (f"resources:\n  - resourceName: {RESOURCE}\n    pfs:\n      - {selector}\n"
            f"        numVfs: {numvfs}\n")


class ConfigMapDir:
    """A mounted ConfigMap: config.yaml -> ..data/config.yaml, ..data -> ..<version>/ swapped atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        root.mkdir(parents=True)
        os.symlink("..data/config.yaml", root / "config.yaml")

    def publish(self, text: str) -> None:
        self.version += 1
        new = self.root / f"..2026_11_23_13_00_{self.version:02d}.000000001"
        new.mkdir()
        (new / "config.yaml").write_text(text)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        os.symlink(new.name, self.root / "..data_tmp")
        os.replace(self.root / "..data_tmp", self.root / "..data")
        if old:
            for f in (self.root / old).iterdir():
                f.unlink()
            (self.root / old).rmdir()


@contextlib.asynccontextmanager
async def running(node: SimNode, settings: Settings, kernel: SimKernel, netlink: SimNetlink,
                  timeouts: Timeouts) -> AsyncIterator[tuple[App, Lifecycle, FakeKubelet]]:
    kubelet = FakeKubelet(settings.device_plugin_dir)
    await kubelet.start()
    agent = build_agent(settings, parse_config(Path(settings.config).read_text()), writer=kernel,
                        netlink=netlink, timeouts=timeouts)
    lc = agent.lifecycle
    assert lc is not None
    runner = asyncio.create_task(agent.run())
    try:
        await kubelet.wait_for(lambda: RESOURCE in kubelet.endpoints
                               and bool(kubelet.endpoints[RESOURCE].updates))
        yield agent, lc, kubelet
    finally:
        await agent.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await kubelet.stop()


Setup = tuple[SimNode, Settings, ConfigMapDir, SimKernel, SimNetlink]


def _setup(sim_root: Path, numvfs: int = 0, first: str | None = None) -> Setup:
    node = dgx_spark(sim_root / "node", numvfs=numvfs)
    cm = ConfigMapDir(sim_root / "cm")
    cm.publish(first or config(4))
    settings = node_settings(node.root, config=str(cm.root / "config.yaml"))
    netlink = SimNetlink(node)
    kernel = SimKernel(node, netlink=netlink, vf_delay=0.02, probe_delay=0.05)
    return node, settings, cm, kernel, netlink


def _healthy(kubelet: FakeKubelet) -> list[str]:
    return kubelet.healthy(RESOURCE)


def test_vfs_created_at_startup_then_resized_through_zero_on_configmap_update(sim_root: Path) -> None:
    node, settings, cm, kernel, netlink = _setup(sim_root)

    async def body() -> None:
        async with running(node, settings, kernel, netlink, Timeouts(vf_wait=10)) as (agent, lc, kubelet):
            # Reconciled before serving: the first device list already has the 4 new VFs.
            assert len(kubelet.endpoints[RESOURCE].updates[0][1]) == 4
            assert len(_healthy(kubelet)) == 4
            cm.publish(config(8))
            await kubelet.wait_for(lambda: len(_healthy(kubelet)) == 8, timeout=10)
            assert [v for p, v in kernel.writes if p.endswith("sriov_numvfs")] == ["4", "0", "8"]
            await _until(lambda: agent.reporter.reconcile_status[PF].actual_vfs == 8)
            cm.publish("resources: [oops\n")  # invalid: rejected, the node stays as it is
            await _until(lambda: bool(lc.config_error))
            assert "not valid YAML" in lc.config_error
            assert agent.resources.config.resources[0].pfs[0].num_vfs == 8
            assert len(_healthy(kubelet)) == 8
    asyncio.run(body())


def test_refuses_to_shrink_under_an_allocated_vf_and_keeps_serving(sim_root: Path) -> None:
    node, settings, cm, kernel, netlink = _setup(sim_root)

    async def body() -> None:
        async with running(node, settings, kernel, netlink, Timeouts(vf_wait=10)) as (agent, _lc, kubelet):
            held = (await kubelet.allocate(RESOURCE, ["0002:01:00.4"])).envs
            assert held["PCIDEVICE_NVIDIA_COM_CX7_QSFP"] == "0002:01:00.4"
            writes = len(kernel.writes)
            cm.publish(config(2))
            await _until(lambda: agent.reporter.reconcile_status[PF].state == "refused")
            st = agent.reporter.reconcile_status[PF]
            assert st.reason == "vf_in_use" and "0002:01:00.4" in st.message
            assert len(kernel.writes) == writes and node.pf(PF).numvfs == 4
            assert agent.stats.get("reconcile_errors", pf=PF, reason="vf_in_use") == 1
            assert len(_healthy(kubelet)) == 4
            resp = await kubelet.allocate(RESOURCE, ["0002:01:00.2"])  # still serving
            assert resp.envs["PCIDEVICE_NVIDIA_COM_CX7_QSFP"] == "0002:01:00.2"
    asyncio.run(body())


def test_a_hung_write_never_blocks_list_and_watch_or_allocate(sim_root: Path) -> None:
    node, settings, cm, kernel, netlink = _setup(sim_root)

    async def body() -> None:
        async with running(node, settings, kernel, netlink, Timeouts(sysfs_write=1.0, vf_wait=10)) as (
                agent, _lc, kubelet):
            hang = kernel.hang_next("sriov_numvfs")
            cm.publish(config(8))
            await asyncio.to_thread(hang.entered.wait, 5)
            # The kernel is stuck in the "0" write; the agent keeps answering the kubelet.
            node.set_pf_link(PF, False)
            await agent.inventory.rescan("udev")
            await kubelet.wait_for(lambda: not _healthy(kubelet), timeout=5)
            node.set_pf_link(PF, True)
            await agent.inventory.rescan("udev")
            await kubelet.wait_for(lambda: len(_healthy(kubelet)) == 4, timeout=5)
            resp = await kubelet.allocate(RESOURCE, ["0002:01:00.3"])
            assert resp.envs["PCIDEVICE_NVIDIA_COM_CX7_QSFP"] == "0002:01:00.3"
            await _until(lambda: agent.reporter.reconcile_status[PF].state == "hung")
            assert agent.reporter.reconcile_status[PF].reason == "write_hung"
            assert agent.stats.get("reconcile_errors", pf=PF, reason="write_hung") == 1
            hang.release.set()
    asyncio.run(body())


def test_pf_reappearing_after_a_driver_reload_is_rebuilt(sim_root: Path) -> None:
    node, settings, _cm, kernel, netlink = _setup(sim_root, first=config(4, 'pciAddress: "0002:01:00.0"'))

    async def body() -> None:
        async with running(node, settings, kernel, netlink, Timeouts(vf_wait=10)) as (agent, _lc, kubelet):
            assert len(_healthy(kubelet)) == 4
            node.remove_vfs(PF)  # mlx5_core unloaded: VFs gone, PF without driver
            node.unprobe(PF)
            await agent.inventory.rescan("udev")
            await kubelet.wait_for(lambda: not kubelet.devices(RESOURCE), timeout=5)
            node.bind(PF, "mlx5_core")  # driver back: the PF re-appears with 0 VFs
            await agent.inventory.rescan("udev")
            await kubelet.wait_for(lambda: len(kubelet.devices(RESOURCE)) == 4, timeout=10)
            assert [v for p, v in kernel.writes if p.endswith("sriov_numvfs")] == ["4", "4"]
    asyncio.run(body())


async def _until(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_serve_dry_run_prints_the_plan_and_changes_nothing(sim_root: Path) -> None:
    node = dgx_spark(sim_root / "node", numvfs=2)
    settings = node_settings(node.root)
    Path(settings.config).write_text(config(4))
    numvfs = node.device_dir(PF) / "sriov_numvfs"
    out = subprocess.run(
        [sys.executable, "-m", "agent", "serve", "--dry-run", "--config", settings.config,
         "--sysfs-root", settings.sysfs_root, "--dev-root", settings.dev_root,
         "--device-plugin-dir", settings.device_plugin_dir, "--devinfo-dir", settings.devinfo_dir,
         "--state-dir", settings.state_dir, "--status-socket", settings.status_socket,
         "--pod-resources-socket", settings.pod_resources_socket, "--log-level", "error"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.splitlines()[:4] == [
        "Plan (dry run, nothing written):",
        f"  1. {PF}: write 0 to sriov_numvfs",
        f"  2. {PF}: write 4 to sriov_numvfs",
        f"  3. {PF}: wait for 4 VFs bound and their netdev/RDMA devices present",
    ]
    assert numvfs.read_text() == "2\n"
    written = (settings.device_plugin_dir, settings.devinfo_dir, settings.state_dir, settings.status_socket)
    for path in written:
        assert not os.path.exists(path), f"--dry-run wrote {path}"


def test_a_restarted_agent_destroys_no_vf_while_podresources_does_not_answer(sim_root: Path) -> None:
    """The agent restarts (its own Allocate record is empty) while the kubelet restarts too (the
    pod-resources directory is there, its socket not yet): a config shrinking numVfs is held back,
    not applied to VFs a running pod may hold. When PodResources answers, the lifecycle asks again by
    itself and follows what it says."""
    node, settings, _cm, kernel, netlink = _setup(sim_root, numvfs=4, first=config(2))
    Path(settings.pod_resources_socket).parent.mkdir(parents=True)
    pods = FakePodResources(settings.pod_resources_socket)

    async def body() -> None:
        async with running(node, settings, kernel, netlink, Timeouts(vf_wait=10)) as (agent, _lc, kubelet):
            try:
                await _until(lambda: PF in agent.reporter.reconcile_status)
                st = agent.reporter.reconcile_status[PF]
                assert (st.state, st.reason) == ("refused", "holders_unknown") and "no socket" in st.message
                assert node.pf(PF).numvfs == 4 and len(_healthy(kubelet)) == 4
                assert not [p for p, _ in kernel.writes if p.endswith("sriov_numvfs")]
                pods.pods = [PodDevice("ml", "nccl-0", "main", RESOURCE, ("0002:01:00.4",))]
                await pods.start()  # the kubelet is back: a pod holds one VF
                def now() -> PfReconcileStatus:
                    return agent.reporter.reconcile_status[PF]
                await _until(lambda: now().reason == "vf_in_use", timeout=15)
                assert node.pf(PF).numvfs == 4 and "0002:01:00.4" in now().message
            finally:
                await pods.stop()
    asyncio.run(body())


def test_when_podresources_answers_the_held_back_change_is_applied(sim_root: Path) -> None:
    node, settings, _cm, kernel, netlink = _setup(sim_root, numvfs=4, first=config(2))
    Path(settings.pod_resources_socket).parent.mkdir(parents=True)
    pods = FakePodResources(settings.pod_resources_socket)

    async def body() -> None:
        async with running(node, settings, kernel, netlink, Timeouts(vf_wait=10)) as (agent, _lc, kubelet):
            try:
                await _until(lambda: agent.reporter.reconcile_status.get(PF) is not None
                             and agent.reporter.reconcile_status[PF].reason == "holders_unknown")
                await pods.start()  # no pod holds a VF
                await kubelet.wait_for(lambda: len(_healthy(kubelet)) == 2, timeout=15)
                assert [v for p, v in kernel.writes if p.endswith("sriov_numvfs")] == ["0", "2"]
                await _until(lambda: agent.reporter.reconcile_status[PF].state == "ok")
            finally:
                await pods.stop()
    asyncio.run(body())


def test_device_type_vfio_pci_binds_the_vfs_and_allocates_their_groups(sim_root: Path) -> None:
    """``deviceType: vfio-pci``: the start-up reconcile moves the VFs mlx5_core probed to vfio-pci
    (driver_override + drivers_probe); they are Healthy once the recovery hold has passed (they were
    first seen on mlx5_core, Unhealthy for this kind)."""
    vfio = config(4).replace("    pfs:", "    deviceType: vfio-pci\n    pfs:")
    node, settings, _cm, kernel, netlink = _setup(sim_root, first=vfio)
    vfs = [node.vf_address(PF, i) for i in range(4)]

    async def body() -> None:
        async with running(node, settings, kernel, netlink, Timeouts(vf_wait=10)) as (agent, _lc, kubelet):
            assert all(os.readlink(node.device_dir(vf) / "driver").endswith("/vfio-pci") for vf in vfs)
            await kubelet.wait_for(lambda: _healthy(kubelet) == vfs, timeout=10)
            group = os.readlink(node.device_dir(vfs[2]) / "iommu_group").rsplit("/", 1)[-1]
            resp = await kubelet.allocate(RESOURCE, [vfs[2]])
            node_dev = f"/dev/vfio/{group}"
            assert [(d.host_path, d.container_path, d.permissions) for d in resp.devices] == [
                ("/dev/vfio/vfio", "/dev/vfio/vfio", "rw"), (node_dev, node_dev, "rw")]
            assert resp.envs["PCIDEVICE_NVIDIA_COM_CX7_QSFP_INFO"] == (
                f'{{"{vfs[2]}":{{"generic":{{"deviceID":"{vfs[2]}"}},'
                f'"vfio":{{"dev-mount":"/dev/vfio/{group}","mount":"/dev/vfio/vfio"}}}}}}')
            node.set_pf_link("enP2p1s0f0np0", up=False)  # the PF's link is the uplink of every VF
            await agent.inventory.rescan("cable pulled")  # no netlink here: the node is read again
            await kubelet.wait_for(lambda: not _healthy(kubelet), timeout=10)
    asyncio.run(body())
