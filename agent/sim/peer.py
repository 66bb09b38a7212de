"""The community SR-IOV device plugin and our agent, each as a real process on one simulated node.

The community plugin (sriovdp, k8snetworkplumbingwg/sriov-network-device-plugin) has no flags for
its paths: it reads /sys and /dev/infiniband, serves in /var/lib/kubelet/device-plugins and writes
device-info files to /var/run/k8s.cni.cncf.io/devinfo/dp, and it asks netlink about every netdev it
finds in sysfs. So it runs

* in a network namespace that holds a veth for every netdev the simulated sysfs names
  (``NodeNetns``), and
* in a private mount namespace where the simulated sys/, dev/infiniband, device-plugin and
  device-info directories are bind-mounted over the real paths. Those mounts live on fresh tmpfs
  layers inside that namespace only, so nothing is created or left behind on the host, and they
  vanish with the process.

Our agent runs from its real ``serve`` command line in the same network namespace, pointed at the
same tree by its path flags. Both are started with ``setpriv --pdeathsig KILL ip netns exec``, each of
which execs the next (no fork), so the process we hold is the plugin itself: its pid is the one to
signal and to read /proc of.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.demo import DEMO_CONFIG, demo_settings
from agent.settings import Settings
from agent.sim.kernel import SimKernel
from agent.sim.node import VFIO_DRIVER, SimNode, dgx_spark

# The plugin gets SIGKILL if the test or bench process dies without cleaning up; set by setpriv, not
# a preexec_fn, which would make Python fork() a process that has gRPC threads.
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"]
PEER_BINARY_ENV = "SRIOV_PEER_BINARY"
PEER_BINARY_NAME = "sriovdp-v3.6.2-30-gd59e6abe6-linux-amd64"
PEER_RESOURCE_PREFIX = "nvidia.com"
# The same resource as the agent's canonical config: every mlx5 VF bound to mlx5_core with RDMA.
PEER_CONFIG = {"resourceList": [{
    "resourceName": "cx7_qsfp", "resourcePrefix": PEER_RESOURCE_PREFIX,
    "selectors": {"vendors": ["15b3"], "devices": ["101e"], "drivers": ["mlx5_core"], "isRdma": True},
}]}
# The vfio-pci kind: the same VFs bound to vfio-pci, as ours serves them with deviceType vfio-pci.
VFIO_RESOURCE = f"{PEER_RESOURCE_PREFIX}/cx7_dpdk"
PEER_VFIO_CONFIG = {"resourceList": [{
    "resourceName": "cx7_dpdk", "resourcePrefix": PEER_RESOURCE_PREFIX,
    "selectors": {"vendors": ["15b3"], "devices": ["101e"], "drivers": ["vfio-pci"]},
}]}
VFIO_CONFIG = f"""\
resources:
  - resourceName: {VFIO_RESOURCE}
    deviceType: vfio-pci
    pfs:
      - pfName: enP2p1s0f0np0
        numVfs: 4
"""

# Runs inside `ip netns exec NS unshare -m --propagation private sh -c`; $1..$7 are the simulated
# sys/, dev/infiniband, dev/vfio (bound only when the node has one), device-plugin dir, device-info
# dir, the config and the binary. Everything under the node root is bound before /dev is replaced,
# since the root may itself live in /dev/shm.
_PEER_MOUNTS = r"""
set -eu
sys=$1 ib=$2 vfio=$3 dp=$4 devinfo=$5 config=$6 bin=$7; shift 7
run=$(readlink -f /var/run)
mount -t tmpfs sriovdp-var-lib /var/lib
mount -t tmpfs sriovdp-run "$run"
stage=$run/sriovdp
mkdir -p /var/lib/kubelet/device-plugins "$run/k8s.cni.cncf.io/devinfo/dp" "$stage/dev"
mount --bind "$dp" /var/lib/kubelet/device-plugins
mount --bind "$devinfo" "$run/k8s.cni.cncf.io/devinfo/dp"
cp "$config" "$stage/config.json"
touch "$stage/sriovdp"
mount --bind "$bin" "$stage/sriovdp"
mount -t tmpfs sriovdp-dev "$stage/dev"
mkdir "$stage/dev/infiniband"
mount --bind "$ib" "$stage/dev/infiniband"
if [ -d "$vfio" ]; then mkdir "$stage/dev/vfio"; mount --bind "$vfio" "$stage/dev/vfio"; fi
for d in null zero urandom; do touch "$stage/dev/$d"; mount --bind "/dev/$d" "$stage/dev/$d"; done
mount --bind "$sys" /sys
mount --move "$stage/dev" /dev
exec "$stage/sriovdp" --config-file "$stage/config.json" "$@"
"""


def peer_binary(repo_root: Path) -> Path:
    """$SRIOV_PEER_BINARY, else the copy in shared/peers/ beside the repository (as CI clones it)."""
    override = os.environ.get(PEER_BINARY_ENV)
    return Path(override) if override else repo_root.parent / "shared" / "peers" / PEER_BINARY_NAME


def netdev_names(node: SimNode) -> list[str]:
    return sorted(p.name for p in (node.sys / "class/net").iterdir())


@dataclass
class NodeNetns:
    """A network namespace with one veth, up and with carrier, per netdev of the simulated node.

    The veth carries the sysfs netdev's name; its far end (``far[name]``) is what a cable pull
    takes down: the named end keeps admin-up and loses carrier, as a PF does when the link drops.
    """

    name: str
    far: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, node: SimNode, name: str = "") -> NodeNetns:
        ns = cls(name or f"sriovp-{uuid.uuid4().hex[:8]}")
        subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
        try:
            lines = []
            for i, dev in enumerate(netdev_names(node)):
                ns.far[dev] = f"far{i}"
                lines += [f"link add {dev} type veth peer name far{i}",
                          f"link set {dev} up", f"link set far{i} up"]
            subprocess.run(["ip", "-n", ns.name, "-batch", "-"], input="\n".join(lines) + "\n", text=True,
                           check=True, capture_output=True)
        except BaseException:
            ns.delete()
            raise
        return ns

    def ip(self, *args: str) -> str:
        return subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True,
                              text=True).stdout

    def set_carrier(self, netdev: str, up: bool) -> None:
        """The far end going down or up: ``netdev`` loses or regains carrier."""
        self.ip("link", "set", self.far[netdev], "up" if up else "down")

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)


@dataclass
class PluginProcess:
    """One device plugin as a real process; stderr goes to ``log_path``."""

    name: str
    argv: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0  # time.monotonic() just before the exec

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.started_at = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                *_DIE_WITH_PARENT, *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)

    async def wait(self, timeout: float) -> int | None:
        """The exit status, or None if still running after ``timeout`` seconds."""
        assert self.proc is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                return await self.proc.wait()
        return None

    async def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout`` s; the exit status."""
        if self.proc is None:
            return 0
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            if await self.wait(timeout) is None:
                await self.kill()
        return await self.proc.wait()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def peer_process(binary: Path, node: SimNode, settings: Settings, *, netns: NodeNetns,
                 log_path: Path, verbosity: int = 10,
                 peer_config: dict[str, object] | None = None) -> PluginProcess:
    """The community plugin on ``node``, with the config for the agent's resource (``PEER_CONFIG``
    unless ``peer_config`` says otherwise)."""
    config = Path(settings.device_plugin_dir).parent / "sriovdp-config.json"
    config.write_text(json.dumps(peer_config or PEER_CONFIG))
    argv = ["ip", "netns", "exec", netns.name, "unshare", "-m", "--propagation", "private",
            "sh", "-c", _PEER_MOUNTS, "sriovdp",
            str(node.sys), str(node.dev / "infiniband"), str(node.dev / "vfio"),
            settings.device_plugin_dir, settings.devinfo_dir,
            str(config), str(binary.resolve()),
            "--resource-prefix", PEER_RESOURCE_PREFIX, "--logtostderr", "-v", str(verbosity)]
    return PluginProcess("peer", argv, log_path)


def agent_process(settings: Settings, netns: NodeNetns, log_path: Path) -> PluginProcess:
    """Our agent's real ``serve`` command line on the same node (settings.config must exist). Every
    path it writes is the node's: its state and status socket too, never the host's /var/run."""
    argv = ["ip", "netns", "exec", netns.name, sys.executable, "-m", "agent", "serve",
            "--config", settings.config, "--sysfs-root", settings.sysfs_root, "--dev-root", settings.dev_root,
            "--device-plugin-dir", settings.device_plugin_dir, "--devinfo-dir", settings.devinfo_dir,
            "--pod-resources-socket", settings.pod_resources_socket, "--state-dir", settings.state_dir,
            "--status-socket", settings.status_socket,
            "--metrics-address", settings.metrics_address, "--health-address", settings.health_address]
    return PluginProcess("ours", argv, log_path)


@dataclass
class PeerNode:
    """A simulated DGX Spark (4 VFs on the QSFP port, enP2p1s0f0np0) whose netdevs are veths in
    ``netns``; either plugin can be started on it, one at a time (they serve the same socket)."""

    root: Path
    sim: SimNode
    settings: Settings  # our agent's, with the kubelet's directories under the node root
    netns: NodeNetns
    binary: Path
    peer_config: dict[str, object] = field(default_factory=lambda: dict(PEER_CONFIG))

    def peer(self, verbosity: int = 10) -> PluginProcess:
        return peer_process(self.binary, self.sim, self.settings, netns=self.netns,
                            log_path=self.root / "peer.log", verbosity=verbosity,
                            peer_config=self.peer_config)

    def ours(self) -> PluginProcess:
        return agent_process(self.settings, self.netns, self.root / "ours.log")

    def vfs(self) -> list[str]:
        pf = self.sim.pf("enP2p1s0f0np0")
        return [self.sim.vf_address(pf.pci_address, i) for i in range(pf.numvfs)]

    def devinfo(self) -> dict[str, tuple[str, str]]:
        """Device-info file name -> (content, permission bits as "0oNNN")."""
        d = Path(self.settings.devinfo_dir)
        return {p.name: (p.read_text(), oct(stat.S_IMODE(p.stat().st_mode))) for p in sorted(d.iterdir())}

    def clear_devinfo(self) -> None:
        for p in Path(self.settings.devinfo_dir).iterdir():
            p.unlink()

    def sockets(self) -> list[str]:
        d = Path(self.settings.device_plugin_dir)
        return sorted(p.name for p in d.iterdir() if stat.S_ISSOCK(p.lstat().st_mode))


@contextlib.contextmanager
def peer_node(binary: Path, *, vfio: bool = False) -> Iterator[PeerNode]:
    """A fresh node on tmpfs (short paths: a unix socket path holds 107 bytes) and its netns;
    both removed on the way out. With ``vfio`` the QSFP port's VFs are bound to vfio-pci (as the
    kernel does it: driver_override, drivers_probe) and both plugins serve them as ``VFIO_RESOURCE``."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="srap-", dir=base))
    try:
        sim = dgx_spark(root / "node")
        settings = demo_settings(sim.root)
        Path(settings.config).write_text(VFIO_CONFIG if vfio else DEMO_CONFIG)
        if vfio:
            kernel = SimKernel(sim)
            pf = sim.pf("enP2p1s0f0np0")
            for i in range(pf.numvfs):
                kernel.rebind(sim.vf_address(pf.pci_address, i), VFIO_DRIVER)
        for d in (settings.device_plugin_dir, settings.devinfo_dir):
            os.makedirs(d)
        netns = NodeNetns.create(sim)
        try:
            yield PeerNode(root, sim, settings, netns, binary,
                           dict(PEER_VFIO_CONFIG if vfio else PEER_CONFIG))
        finally:
            netns.delete()
    finally:
        shutil.rmtree(root, ignore_errors=True)
