"""Boots the test VM: Debian's 6.1 kernel under QEMU TCG, the host root shared read-only over 9p.

The guest's /init (built by scripts/vm/build-assets.sh) chroots into the host root and runs
``/tmp/vm/run.sh`` from a read-write 9p share (the "results" directory on the host), so a guest job is
an ordinary shell script that runs the project's own venv, and everything it writes under /tmp/vm
comes back to the host. Used by tests/vm/conftest.py and bench/bench_vm_provision.py.
"""

from __future__ import annotations

import ast
import os
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("VM_CACHE_DIR", REPO / ".cache" / "vm"))
BUILD_SCRIPT = REPO / "scripts" / "vm" / "build-assets.sh"
QEMU = "qemu-system-x86_64"
GUEST_TESTS = REPO / "tests" / "vm" / "guest"
GUEST_DIR = "/tmp/vm"  # where the results share is mounted inside the guest's chroot

# Modules the guest loads before the job (the kernel cannot autoload them: its modprobe helper runs in
# the initramfs): the NVMe PF driver (SR-IOV), the NIC that Soft-RoCE sits on, macvlan (netdevs for
# Soft-RoCE "VFs"), netdevsim (built out of tree), Soft-RoCE, the verbs/CM character devices, pci-stub
# (a VF driver to bind), vfio-pci (the vfio-pci device kind), and crc32_generic: without it
# "rdma link add ... type rxe" fails with ENOENT.
GUEST_MODULES = ("nvme", "virtio_net", "macvlan", "netdevsim", "rdma_rxe", "ib_uverbs", "rdma_ucm",
                 "pci-stub", "vfio-pci", "crc32_generic")

NVME_TOTAL_VFS = 8


class VmUnavailable(Exception):
    """QEMU cannot run on this host at all (the tier skips, loudly)."""


class VmError(Exception):
    """The VM or its assets failed; the message carries the log that explains it."""


@dataclass(frozen=True)
class Assets:
    dir: Path
    kver: str
    kernel: Path
    initrd: Path
    modroot: Path  # <modroot>/lib/modules/<kver>: what the guest's ``modprobe -d`` reads


@dataclass
class VmRun:
    exit_code: int | None  # the job's exit code; None if the guest never got that far
    timed_out: bool
    elapsed: float
    results: Path
    console: str
    guest_log: str = field(default="")

    def describe(self, tail: int = 120) -> str:
        """What a failing test prints: the job's own output, then the kernel console."""
        def last(text: str) -> str:
            return "\n".join(text.splitlines()[-tail:])
        return (f"VM job exit={self.exit_code} timed_out={self.timed_out} after {self.elapsed:.1f}s\n"
                f"--- guest job output (last {tail} lines) ---\n{last(self.guest_log)}\n"
                f"--- console (last {tail} lines) ---\n{last(self.console)}")


def find_qemu() -> str:
    """The qemu binary, installing Debian's qemu-system-x86 when we are root and it is missing."""
    path = shutil.which(QEMU)
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run([str(REPO / "scripts" / "setup-tools.sh")], check=False, timeout=900)
        path = shutil.which(QEMU)
    if path is None:
        raise VmUnavailable(f"{QEMU} not found and could not be installed (Debian package qemu-system-x86; "
                            "run scripts/setup-tools.sh as root)")
    return path


def prepare_assets(cache: Path = CACHE, timeout: float = 1200) -> Assets:
    """Run the (idempotent, cached) asset build and return the paths it produced."""
    missing = [t for t in ("apt-get", "dpkg-deb", "make", "gcc", "depmod", "cpio") if shutil.which(t) is None]
    if missing:
        raise VmUnavailable(f"cannot build the VM assets: missing {', '.join(missing)} "
                            "(a Debian host with kmod, cpio, make and gcc is needed)")
    try:
        proc = subprocess.run([str(BUILD_SCRIPT), str(cache)], check=False, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise VmError(f"{BUILD_SCRIPT} did not finish in {timeout:.0f}s:\n{e.stderr or ''}") from e
    if proc.returncode != 0:
        raise VmError(f"{BUILD_SCRIPT} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    d = (cache / "current").resolve()
    kver = (d / "KVER").read_text().strip()
    return Assets(dir=d, kver=kver, kernel=d / "vmlinuz", initrd=d / "initramfs.cpio.gz",
                  modroot=d / "modroot")


def qemu_command(qemu: str, assets: Assets, results: Path, *,
                 memory_mb: int = 2048, cpus: int = 2) -> list[str]:
    """TCG only: nested KVM hangs on the CI machines. q35 gives PCIe, which SR-IOV needs, and takes the
    emulated VT-d (intel-iommu, created before the devices it translates for; intel_iommu=on in the
    guest), so VFs bound to vfio-pci sit in real IOMMU groups."""
    return [
        qemu, "-accel", "tcg", "-cpu", "max", "-machine", "q35", "-smp", str(cpus), "-m", str(memory_mb),
        "-nodefaults", "-vga", "none", "-display", "none", "-no-reboot",
        "-device", "intel-iommu",
        "-serial", f"file:{results / 'console.log'}",
        "-kernel", str(assets.kernel), "-initrd", str(assets.initrd),
        "-append", "console=ttyS0 quiet panic=-1 intel_iommu=on",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none",
        # The NIC Soft-RoCE runs on; user networking with no way out.
        "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0,romfile=",
        # An NVMe controller with SR-IOV: the kernel's sriov_numvfs semantics are the same as a NIC PF's.
        "-device", "pcie-root-port,id=rp0,chassis=1,slot=1",
        "-device", "nvme-subsys,id=s0",
        "-device", (f"nvme,serial=sriovpf0,subsys=s0,bus=rp0,sriov_max_vfs={NVME_TOTAL_VFS},max_ioqpairs=26,"
                    "msix_qsize=32,sriov_vq_flexible=24,sriov_vi_flexible=16"),
    ]


def job_script(assets: Assets, body: str) -> str:
    """run.sh: environment, guest modules, then the caller's commands (output to guest.log and console)."""
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
        "VM_REPO": str(REPO), "VM_MODROOT": str(assets.modroot), "VM_RESULTS": GUEST_DIR,
        "VM_PYTHON": sys.executable, "VM_NVME_TOTAL_VFS": str(NVME_TOTAL_VFS),
    }
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
    modules = " ".join(GUEST_MODULES)
    return (f"{exports}\ncd \"$VM_REPO\"\n"
            f"{{\n"
            f"modprobe -d \"$VM_MODROOT\" -a {modules} || echo \"vm-job: modprobe failed: $?\"\n"
            f"{body}\n"
            f"echo $? > {GUEST_DIR}/job-exit-code\n"
            f"}} 2>&1 | tee {GUEST_DIR}/guest.log\n"
            f"exit \"$(cat {GUEST_DIR}/job-exit-code 2>/dev/null || echo 255)\"\n")


# Directories the guest covers with fresh tmpfs mounts (see the init in scripts/vm/build-assets.sh).
GUEST_TMPFS = ("/tmp", "/run", "/dev/shm")


def hidden_paths() -> list[str]:
    """Host paths the guest needs that its tmpfs mounts would hide: the checkout and the interpreter."""
    wanted = {str(REPO), str(Path(sys.executable).resolve().parent)}
    return sorted(p for p in wanted if any(p == t or p.startswith(t + "/") for t in GUEST_TMPFS))


def run_vm(assets: Assets, results: Path, body: str, *,
           timeout: float = 600, qemu: str | None = None) -> VmRun:
    """Boot the VM once, run ``body`` (shell) in the guest chroot, and return what came back."""
    qemu = qemu or find_qemu()
    results.mkdir(parents=True, exist_ok=True)
    for stale in ("exit-code", "job-exit-code", "guest.log", "console.log"):
        (results / stale).unlink(missing_ok=True)
    (results / "run.sh").write_text(job_script(assets, body))
    (results / "binds").write_text("".join(f"{p}\n" for p in hidden_paths()))
    cmd = qemu_command(qemu, assets, results)
    (results / "qemu-command").write_text(shlex.join(cmd) + "\n")
    t0 = time.monotonic()
    timed_out = False
    with open(results / "qemu.log", "w") as qlog:
        proc = subprocess.Popen(cmd, stdout=qlog, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - t0

    def read(name: str) -> str:
        p = results / name
        return p.read_text(errors="replace") if p.exists() else ""

    code = read("exit-code").strip()
    console = read("console.log")
    if proc.returncode not in (0, None) and not timed_out:
        console += f"\n[qemu exited {proc.returncode}]\n{read('qemu.log')}"
    return VmRun(exit_code=int(code) if code.lstrip("-").isdigit() else None, timed_out=timed_out,
                 elapsed=elapsed, results=results, console=console, guest_log=read("guest.log"))


@dataclass(frozen=True)
class CaseResult:
    name: str  # "module.py::test_name[param]"
    outcome: str  # passed | failed | error | skipped
    detail: str


def parse_junit(path: Path) -> dict[str, CaseResult]:
    """pytest's junit XML from the guest -> results by "file::test"."""
    out: dict[str, CaseResult] = {}
    if not path.exists():
        return out
    for case in ET.parse(path).getroot().iter("testcase"):
        module = (case.get("classname") or "").rsplit(".", 1)[-1]
        name = f"{module}.py::{case.get('name')}"
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = "failed" if tag == "failure" else tag
                detail = f"{el.get('message') or ''}\n{el.text or ''}"
                break
        out[name] = CaseResult(name, outcome, detail)
    return out


def guest_modules() -> list[Path]:
    return sorted(p for p in GUEST_TESTS.glob("*.py") if p.name not in ("conftest.py", "guestlib.py"))


def guest_tests() -> list[str]:
    """'module.py::test_name' for every top-level test function in the guest modules (read, not imported)."""
    names = []
    for mod in guest_modules():
        tree = ast.parse(mod.read_text())
        names += [f"{mod.name}::{n.name}" for n in tree.body
                  if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    return names


@dataclass
class GuestSession:
    run: VmRun
    cases: dict[str, CaseResult]

    def results_for(self, test: str) -> list[CaseResult]:
        return [c for name, c in self.cases.items() if name == test or name.startswith(test + "[")]


def guest_pytest(paths: list[str]) -> str:
    """The job that runs the guest tests, with a JUnit report in the results share (parse_junit)."""
    return (f'"$VM_PYTHON" -m pytest -p no:cacheprovider -q -rA -o junit_family=xunit1 '
            f"--junitxml={GUEST_DIR}/junit.xml {shlex.join(paths)}")


def main(argv: list[str]) -> int:
    """Developer entry point: boot the VM and run pytest on the given guest test paths (default: all)."""
    assets = prepare_assets()
    results = CACHE / "last-run"
    run = run_vm(assets, results, guest_pytest(argv or [str(m) for m in guest_modules()]))
    print(run.describe(tail=400))
    print(f"results in {results}")
    return 0 if run.exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
