"""How much the agent uses, to size the DaemonSet's requests and limits (daemonset/daemonset.yaml).

Runs the real `sriov-rdma-agent serve` (a subprocess, as in the pod) against a simulated node with a
kubelet stand-in, for the shipped config (DGX Spark: 4 VFs) and for 2 PFs x 127 VFs (the CX-7 firmware
maximum), and prints per case: time from start to the kubelet holding every device, peak RSS (VmHWM),
CPU used while idle, and the memory request/limit as multiples of the peak.

    .venv/bin/python bench/daemonset_sizing.py [--idle-seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml
from procstat import cpu_seconds, free_port, status_kib

from agent.sim.kubelet import FakeKubelet
from agent.sim.node import SimNode, SimPf, dgx_spark

REPO = Path(__file__).resolve().parent.parent
RESOURCE = "nvidia.com/cx7_qsfp"
BIG_CONFIG = f"""\
resources:
  - resourceName: {RESOURCE}
    pfs:
      - {{pfName: enP2p1s0f0np0, numVfs: 127}}
      - {{pfName: enP2p1s0f1np1, numVfs: 127}}
"""


def peak_rss_mib(pid: int) -> float:
    return status_kib(pid, "VmHWM") / 1024


def mib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * (1024 if unit == "Gi" else 1)


async def measure(root: Path, config: str, devices: int, idle: float) -> tuple[float, float, float]:
    (root / "config.yaml").write_text(config)
    plugins = root / "var/lib/kubelet/device-plugins"
    plugins.mkdir(parents=True)
    kubelet = FakeKubelet(str(plugins))
    await kubelet.start()
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "serve", f"--config={root}/config.yaml", f"--sysfs-root={root}",
        f"--dev-root={root}", f"--device-plugin-dir={plugins}", f"--devinfo-dir={root}/devinfo",
        f"--pod-resources-socket={root}/pod-resources.sock", f"--metrics-address=127.0.0.1:{free_port()}",
        f"--health-address=127.0.0.1:{free_port()}", f"--status-socket={root}/status.sock",
        "--log-level=warning", cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await kubelet.wait_for(lambda: len(kubelet.devices(RESOURCE)) == devices, timeout=60)
        ready = time.perf_counter() - start
        await asyncio.sleep(2)  # let start-up work settle before the idle window
        before = cpu_seconds(proc.pid)
        await asyncio.sleep(idle)
        idle_cpu = (cpu_seconds(proc.pid) - before) / idle
        return ready, peak_rss_mib(proc.pid), idle_cpu
    finally:
        proc.terminate()
        await proc.wait()
        await kubelet.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    idle = parser.parse_args().idle_seconds
    daemonset = yaml.safe_load((REPO / "daemonset/daemonset.yaml").read_text())
    resources = daemonset["spec"]["template"]["spec"]["containers"][0]["resources"]
    request, limit = mib(resources["requests"]["memory"]), mib(resources["limits"]["memory"])
    cases = [
        ("DGX Spark, daemonset/config.yaml (4 VFs)", (REPO / "daemonset/config.yaml").read_text(), 4,
         dgx_spark),
        ("2 PFs x 127 VFs", BIG_CONFIG, 254, lambda root: SimNode(root=root, pfs=[
            SimPf("0002:01:00.0", "enP2p1s0f0np0", totalvfs=127, numvfs=127),
            SimPf("0002:01:00.1", "enP2p1s0f1np1", totalvfs=127, numvfs=127, sriov_offset=128)]).build()),
    ]
    print(f"memory request {request:.0f} MiB, limit {limit:.0f} MiB; idle window {idle:.0f} s")
    print(f"{'case':<42} {'ready (s)':>9} {'peak RSS (MiB)':>15} {'idle CPU (%)':>13} "
          f"{'request/peak':>13} {'limit/peak':>11}")
    for name, config, devices, build in cases:
        tmpfs = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        root = Path(tempfile.mkdtemp(prefix="sizing-", dir=tmpfs))
        try:
            build(root)
            ready, rss, cpu = asyncio.run(measure(root, config, devices, idle))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"{name:<42} {ready:>9.2f} {rss:>15.1f} {cpu * 100:>13.2f} "
              f"{request / rss:>13.2f} {limit / rss:>11.2f}")


if __name__ == "__main__":
    main()
