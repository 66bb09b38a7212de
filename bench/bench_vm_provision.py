"""VF provisioning on a real kernel: the agent vs a bare ``echo N > sriov_numvfs`` (target ratio <= 1.1).

Boots the test VM (tests/vm: Debian 6.1 kernel under QEMU TCG, an NVMe PF with SR-IOV, 8 VFs max) once
and, inside it, alternates two ways of going from 0 to N VFs on the same PF:

* bare: ``write(sriov_numvfs, N)`` and then until every ``virtfnK`` link exists with its ``physfn``
  (the write is synchronous, so this is the write itself);
* agent: the running agent (``agent.cli.serve``) gets its config changed to ``numVfs: N`` (atomic
  rename, as a ConfigMap update) and the clock stops when sriov_numvfs reads N with all VFs present
  ("kernel"), and again when the kubelet stand-in's ListAndWatch stream holds the N VF IDs
  ("kubelet": what a pod scheduler can use).

Bare rounds run before and after the agent's (half each), with no agent running; both go back to 0
between rounds; each agent round starts with the agent idle (its previous reconcile finished). VFs
come up unbound (``driversAutoprobe: false`` for the agent, ``sriov_drivers_autoprobe=0`` for bare) so
neither waits on the nvme driver failing to probe a VF that has no queue resources. Under TCG the
agent's Python runs ~20-30x slower than natively while QEMU's NVMe VF creation is cheap, so the ratio
here overstates the agent's share compared with mlx5 hardware, where creating VFs takes seconds.

    .venv/bin/python bench/bench_vm_provision.py [--vfs 8] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests" / "vm"), str(REPO / "tests" / "vm" / "guest")]  # the VM tier's harness

from agentrun import RESOURCE, serving, until  # noqa: E402
from guestlib import NVME_CLASS, SYS_PCI, read, write_sysfs  # noqa: E402
from vmharness import CACHE, GUEST_DIR, prepare_assets, run_vm  # noqa: E402

# ---------------------------------------------------------------------------- guest side
IDLE_S = 4.0  # the agent is idle (as bare's kernel is) when a round starts


def guest(vfs: int, rounds: int, out: Path) -> None:
    (pf,) = [d.resolve() for d in SYS_PCI.iterdir()
             if (d / "sriov_totalvfs").exists() and read(d / "class") == NVME_CLASS]

    def present(n: int) -> bool:
        links = list(pf.glob("virtfn*"))
        return (read(pf / "sriov_numvfs") == str(n) and len(links) == n
                and all((link / "physfn").exists() for link in links))

    def config(n: int) -> str:
        return (f"resources:\n  - resourceName: {RESOURCE}\n    rdma: false\n    pfs:\n"
                f'      - pciAddress: "{pf.name}"\n        numVfs: {n}\n        driversAutoprobe: false\n')

    def bare_once() -> float:
        write_sysfs(pf / "sriov_numvfs", "0")
        write_sysfs(pf / "sriov_drivers_autoprobe", "0")
        t0 = time.perf_counter()
        write_sysfs(pf / "sriov_numvfs", str(vfs))
        while not present(vfs):
            time.sleep(0.001)
        return time.perf_counter() - t0

    results: dict[str, list[float]] = {"bare": [], "agent_kernel": [], "agent_kubelet": []}

    async def agent_rounds() -> None:
        async with serving("/", config(0)) as served:
            for _ in range(rounds):
                await asyncio.sleep(IDLE_S)  # let the previous reconcile finish its closing observe round
                t0 = time.perf_counter()
                served.write_config(config(vfs))
                while not present(vfs):  # polled in the loop: no thread hop in the measurement
                    await asyncio.sleep(0.001)
                results["agent_kernel"].append(time.perf_counter() - t0)
                await served.kubelet.wait_for(lambda: len(served.kubelet.devices(RESOURCE)) == vfs,
                                              timeout=60)
                results["agent_kubelet"].append(time.perf_counter() - t0)
                served.write_config(config(0))
                await until(lambda: present(0), 60, "the agent to remove the VFs")
                await served.kubelet.wait_for(lambda: not served.kubelet.devices(RESOURCE), timeout=30)

    # Bare rounds before and after the agent's (with no agent running: it would reconcile them away).
    results["bare"] += [bare_once() for _ in range((rounds + 1) // 2)]
    write_sysfs(pf / "sriov_numvfs", "0")
    asyncio.run(agent_rounds())
    results["bare"] += [bare_once() for _ in range(rounds // 2)]
    write_sysfs(pf / "sriov_numvfs", "0")
    out.write_text(json.dumps({"vfs": vfs, "rounds": rounds, "seconds": results}))


# ---------------------------------------------------------------------------- host side
def host(vfs: int, rounds: int) -> int:
    t0 = time.monotonic()
    assets = prepare_assets()
    prepared = time.monotonic() - t0
    results = CACHE / "bench-provision"
    body = (f'"$VM_PYTHON" {REPO / "bench" / "bench_vm_provision.py"} --guest '
            f"--vfs {vfs} --rounds {rounds} --out {GUEST_DIR}/bench.json")
    run = run_vm(assets, results, body, timeout=900)
    data_file = results / "bench.json"
    if run.exit_code != 0 or not data_file.exists():
        print(run.describe(), file=sys.stderr)
        return 1
    data = json.loads(data_file.read_text())
    sec = data["seconds"]
    med = {k: statistics.median(v) for k, v in sec.items()}
    print(f"VM: kernel {assets.kver}, QEMU TCG; NVMe PF 0 -> {vfs} VFs, {rounds} rounds each "
          f"(assets ready in {prepared:.1f}s, VM run {run.elapsed:.1f}s)")
    print(f"{'path':<34}{'median ms':>10}{'min ms':>9}{'max ms':>9}")
    names = {"bare": "bare echo N > sriov_numvfs", "agent_kernel": "agent: config -> VFs in kernel",
             "agent_kubelet": "agent: config -> kubelet lists VFs"}
    for key, label in names.items():
        v = sec[key]
        print(f"{label:<34}{med[key] * 1e3:>10.1f}{min(v) * 1e3:>9.1f}{max(v) * 1e3:>9.1f}")
    print(f"ratio agent/bare (VFs in kernel):  {med['agent_kernel'] / med['bare']:.2f}  (target <= 1.1)")
    print(f"ratio agent/bare (kubelet lists):  {med['agent_kubelet'] / med['bare']:.2f}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vfs", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.guest:
        if os.environ.get("BENCH_LOG"):
            logging.basicConfig(level=logging.INFO, format="%(relativeCreated)9.1f %(name)s %(message)s")
        if not os.environ.get("VM_RESULTS"):
            p.error("--guest runs inside the test VM only")
        guest(a.vfs, a.rounds, a.out)
        return 0
    return host(a.vfs, a.rounds)


if __name__ == "__main__":
    sys.exit(main())
