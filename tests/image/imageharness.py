"""Builds the agent's container image for linux/amd64 and linux/arm64 and runs commands in it, with no
Docker engine and no registry: buildah (``--isolation chroot``) over a private image store, a Python base
made from Debian packages (scripts/image/python-base.sh) standing in for the registry's, and arm64
under qemu-user. A command runs as the kubelet would run the container with ``readOnlyRootFilesystem:
true``: the image's root bind-mounted read-only, the pod's volumes bound over it, under strace, which
records every attempt to write a file, create a directory or bind a unix socket.

Everything lands in the cache (IMAGE_CACHE_DIR, default <repo>/.cache/image), so a second run builds
nothing unless the build's inputs changed:

    storage-<driver>/, run-<driver>/   buildah's image store: the bases and the built image
    built/<key>.json                   a complete build of those inputs (the key), with its timings
    lock                               a build holds it exclusively, a session using the images shared
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("IMAGE_CACHE_DIR", REPO / ".cache" / "image"))
BASE_SCRIPT = REPO / "scripts" / "image" / "python-base.sh"
BUILD_SCRIPT = REPO / "scripts" / "image" / "build.sh"
BINFMT_SCRIPT = REPO / "scripts" / "image" / "binfmt.sh"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")  # the TLS-intercepting proxy's CA is in here
ARCHES = ("amd64", "arm64")
ELF_MACHINE = {"amd64": 62, "arm64": 183}  # e_machine: EM_X86_64, EM_AARCH64
BASE_NAME = "localhost/sriov-rdma-agent-python-base"
IMAGE_NAME = "localhost/sriov-rdma-agent"
CONTAINER_PREFIX = "sriov-rdma-agent-test-"
_serial = itertools.count()
TOOLS = ("buildah", "debootstrap", "strace", "unshare", "chroot", "mount")
BASE_TIMEOUT = 900  # an arm64 debootstrap under qemu-user takes ~3 min on an idle machine
BUILD_TIMEOUT = 1200


class ImageUnavailable(Exception):
    """The tier cannot run on this machine at all (it skips, saying why)."""


class ImageError(Exception):
    """A base or the image failed to build; the message carries the tool's output."""


def _run(cmd: Sequence[str | Path], *, env: dict[str, str] | None = None, timeout: float = 120,
         what: str = "") -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise ImageError(f"{what or shlex.join(map(str, cmd))} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


def _tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------ the machine

def check_machine() -> None:
    if os.geteuid() != 0:
        raise ImageUnavailable("needs root (buildah --isolation chroot, debootstrap, mount namespaces)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing and shutil.which("apt-get"):
        _run([REPO / "scripts" / "setup-tools.sh"], timeout=900, what="scripts/setup-tools.sh")
        missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise ImageError(f"missing {', '.join(missing)}: scripts/setup-tools.sh installs them "
                         "(scripts/debian-tools.txt)")


def ensure_binfmt() -> None:
    """qemu-user for the foreign arches, registered with binfmt_misc (a reboot forgets it)."""
    _run([BINFMT_SCRIPT, *ARCHES], what=BINFMT_SCRIPT.name)


def overlay_works(directory: Path) -> bool:
    """Can the kernel mount overlayfs with its upper dir in ``directory``? (Not on overlayfs itself.)"""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        dirs = {d: Path(tmp) / d for d in ("lower", "upper", "work", "merged")}
        for d in dirs.values():
            d.mkdir()
        opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
        if subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["merged"])],
                          capture_output=True, check=False).returncode != 0:
            return False
        subprocess.run(["umount", str(dirs["merged"])], check=True)
        return True


# ------------------------------------------------------------------ the image store

class Store:
    """buildah over a private store in the cache. overlay where the kernel allows it: with vfs every
    build step and every container is a full copy of the root filesystem (a cached build of both arches
    takes minutes instead of seconds); IMAGE_STORAGE_DRIVER=vfs forces it."""

    def __init__(self, cache: Path = CACHE) -> None:
        cache.mkdir(parents=True, exist_ok=True)
        self.cache = cache
        self.driver = os.environ.get("IMAGE_STORAGE_DRIVER") or ("overlay" if overlay_works(cache) else "vfs")
        conf = cache / f"storage-{self.driver}.conf"
        conf.write_text(f'[storage]\ndriver = "{self.driver}"\ngraphroot = "{cache}/storage-{self.driver}"\n'
                        f'runroot = "{cache}/run-{self.driver}"\n')
        self.env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf), "BUILDAH_ISOLATION": "chroot"}

    def buildah(self, *args: str, timeout: float = 300) -> str:
        return _run(["buildah", *args], env=self.env, timeout=timeout)

    def exists(self, ref: str) -> bool:
        return subprocess.run(["buildah", "inspect", "--type", "image", ref], env=self.env,
                              capture_output=True, check=False).returncode == 0

    def inspect(self, ref: str) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(self.buildah("inspect", "--type", "image", ref))
        return info

    def manifest(self, ref: str) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(self.buildah("manifest", "inspect", ref))
        return info

    def layer_sizes(self, ref: str) -> list[int]:
        """Bytes of each of the image's layers, uncompressed, base first."""
        return [int(layer["size"]) for layer in json.loads(self.inspect(ref)["Manifest"])["layers"]]

    @contextlib.contextmanager
    def session(self) -> Iterator[Callable[[], None]]:
        """Hold the cache for a test session: exclusively while building (the caller then calls the
        yielded function), shared afterwards, so no other session drops an image this one runs."""
        with open(self.cache / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield lambda: fcntl.flock(lock, fcntl.LOCK_SH)

    @contextlib.contextmanager
    def rootfs(self, ref: str) -> Iterator[Path]:
        """A working container of ``ref``, mounted: its writable layer is the container's, not the image's."""
        name = f"{CONTAINER_PREFIX}{os.getpid()}-{next(_serial)}"
        ctr = self.buildah("from", "--pull=never", "--quiet", "--name", name, ref).strip()
        try:
            yield Path(self.buildah("mount", ctr).strip())
        finally:
            self.buildah("rm", ctr)

    def reap(self) -> None:
        """Remove what interrupted work left behind: working containers of a failed or killed build, and
        those of test sessions whose process is gone. Call it holding the lock exclusively."""
        for ctr in json.loads(self.buildah("containers", "--json")) or []:
            name = ctr.get("containername", "")
            pid = name.removeprefix(CONTAINER_PREFIX).split("-")[0]
            if not name.startswith(CONTAINER_PREFIX) or not Path(f"/proc/{pid}").exists():
                subprocess.run(["buildah", "rm", ctr["id"]], env=self.env, capture_output=True, check=False)


# ------------------------------------------------------------------ bases and the build

def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:16]


def ensure_bases(store: Store) -> str:
    """The stand-in base for every arch (made once per version of the base script), as one manifest list:
    the Dockerfile's ``FROM ${PYTHON_IMAGE}`` resolves it per platform, as it does python:3.11-slim."""
    key = _digest(BASE_SCRIPT.read_bytes())
    missing = [a for a in ARCHES if not store.exists(f"{BASE_NAME}:{key}-{a}")]
    started = time.monotonic()
    procs = {a: subprocess.Popen([str(BASE_SCRIPT), a, f"{BASE_NAME}:{key}-{a}"], env=store.env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for a in missing}
    failed = []
    for arch, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=max(1.0, BASE_TIMEOUT - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            failed.append(f"{arch}: timed out after {BASE_TIMEOUT}s\n{_tail(out)}")
            continue
        if proc.returncode != 0:
            failed.append(f"{arch}: exit {proc.returncode}\n{_tail(out)}")
    if failed:
        raise ImageError(f"{BASE_SCRIPT.name} failed:\n" + "\n".join(failed))
    if missing:
        MEASURED[f"base build ({', '.join(missing)} in parallel) [s]"] = round(time.monotonic() - started, 1)
        drop_other_bases(store, key)
    name = f"{BASE_NAME}:{key}"
    subprocess.run(["buildah", "manifest", "rm", name], env=store.env, capture_output=True, check=False)
    store.buildah("manifest", "create", name)
    for arch in ARCHES:
        store.buildah("manifest", "add", name, f"containers-storage:{BASE_NAME}:{key}-{arch}")
    return name


def drop_other_bases(store: Store, key: str) -> None:
    """A new base makes the old bases and every image built on them garbage: remove them."""
    for image in json.loads(store.buildah("images", "--json")):
        for name in image.get("names") or []:
            if name.startswith(f"{BASE_NAME}:") and not name.startswith(f"{BASE_NAME}:{key}"):
                subprocess.run(["buildah", "rmi", "--force", name], env=store.env, capture_output=True,
                               check=False)
    subprocess.run(["buildah", "rmi", "--prune"], env=store.env, capture_output=True, check=False)


def context_files() -> list[Path]:
    """What .dockerignore (an allow-list) lets into the build context, minus the bytecode it drops."""
    allowed = [line.strip()[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    files: list[Path] = []
    for entry in allowed:
        path = REPO / entry
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files += [p for p in found if "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return files


def build_key(store: Store, base: str) -> str:
    """Everything the build reads from here: Dockerfile, context, build script, base, buildah itself."""
    parts: list[bytes | str] = [store.buildah("version")]
    for arch in ARCHES:
        parts.append(store.inspect(f"{base}-{arch}")["FromImageID"])
    for path in [REPO / "Dockerfile", REPO / ".dockerignore", BUILD_SCRIPT, *context_files()]:
        parts += [str(path.relative_to(REPO)), path.read_bytes()]
    return _digest(*parts)


@dataclass(frozen=True)
class Built:
    name: str  # the manifest list
    base: str  # the base's manifest list
    refs: dict[str, str]  # arch -> the image by digest


def ensure_image(store: Store, base: str) -> Built:
    """The Dockerfile built for every arch by scripts/image/build.sh (what `make image` runs), unless a
    complete build of the same inputs is in the cache.

    Without ``--layers``: buildah 1.28's layer cache is wrong for ``RUN --mount=type=bind`` (the Dockerfile's
    install step). Its cache key is the step's text, not what it mounts, so the step is reused after the
    lock file or the agent's wheel changed; and when the ``from=wheel`` stage comes wholly from the cache,
    the mount is empty. A full build of both arches costs about a minute."""
    key = build_key(store, base)
    name = f"{IMAGE_NAME}:test-{key}"
    marker = store.cache / "built" / f"{key}.json"
    if marker.exists() and store.exists(name) and all(map(store.exists, instances(store, name).values())):
        MEASURED["image build [s]"] = f"cached (built in {json.loads(marker.read_text())['build_seconds']} s)"
    else:
        for old in (store.cache / "built").glob("*.json"):
            subprocess.run(["buildah", "manifest", "rm", f"{IMAGE_NAME}:test-{old.stem}"], env=store.env,
                           capture_output=True, check=False)
            old.unlink()
        # The old lists' images (no session is using them: we hold the lock exclusively).
        subprocess.run(["buildah", "rmi", "--prune"], env=store.env, capture_output=True, check=False)
        env = {**store.env, "IMAGE": name, "PYTHON_IMAGE": base}
        if HOST_CA.exists():
            env["CA_BUNDLE"] = str(HOST_CA)
        started = time.monotonic()
        _run([BUILD_SCRIPT], env=env, timeout=BUILD_TIMEOUT, what=f"{BUILD_SCRIPT.name} ({name})")
        info = {"build_seconds": round(time.monotonic() - started, 1), "driver": store.driver}
        marker.parent.mkdir(exist_ok=True)
        marker.write_text(json.dumps(info))
        MEASURED["image build [s]"] = info["build_seconds"]
    return Built(name=name, base=base, refs=instances(store, name))


def instances(store: Store, name: str) -> dict[str, str]:
    """arch -> the image a manifest list names for it, by digest."""
    listed = store.manifest(name)["manifests"]
    return {m["platform"]["architecture"]: f"{IMAGE_NAME}@{m['digest']}" for m in listed}


# ------------------------------------------------------------------ running a container, read-only

@dataclass(frozen=True)
class Mount:
    source: Path  # on the host
    target: str  # in the container
    read_only: bool


@dataclass(frozen=True)
class Write:
    syscall: str
    path: str  # as the container sees it, symlinks in the image resolved

    def under(self, directories: Sequence[str]) -> bool:
        return any(self.path == d or self.path.startswith(d.rstrip("/") + "/") for d in directories)


# Opening /dev/null for writing writes no file (Python's standard library does it at import time).
SINKS = ("/dev/null",)


def outside(writes: Sequence[Write], writable: Sequence[str]) -> list[Write]:
    """The write attempts that land neither in ``writable`` nor in a sink."""
    return [w for w in writes if not w.under([*writable, *SINKS])]


def in_root(root: Path, path: str) -> str:
    """``path`` as the container resolves it: symlinks of the image's own tree (like /var/run -> /run)
    are followed inside ``root``, never into the host's."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    out: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if out:
                out.pop()
            continue
        candidate = root.joinpath(*out, part)
        if candidate.is_symlink() and hops < 40:
            hops += 1
            target = os.readlink(candidate)
            if target.startswith("/"):
                out = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        out.append(part)
    return "/" + "/".join(out)


def container_env(config: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    """The process environment a runtime gives the container: the image's ENV, HOME, then the pod's env."""
    image_env = dict(e.split("=", 1) for e in config.get("Env") or [])
    return {"HOME": "/root", **image_env, **env}


def container_command(root: Path, mounts: Sequence[Mount], argv: Sequence[str], trace: Path) -> list[str]:
    """A command line that runs ``argv`` in ``root`` the way a runtime runs a privileged container with
    readOnlyRootFilesystem: in its own mount namespace the root is a read-only bind of the image, with
    /proc, the host's /dev (privileged), a fresh /dev/shm, /sys read-only and the pod's volumes on top.
    strace follows the container's processes and logs every call that could write a file."""
    lines = ['set -eu', 'R="$1"; T="$2"; shift 2',
             'mount --bind "$R" "$R"', 'mount -o remount,bind,ro "$R"',
             'mount -t proc proc "$R/proc"', 'mount --rbind /dev "$R/dev"',
             'mount -t tmpfs -o mode=1777,size=64m shm "$R/dev/shm"',
             'mount --bind /sys "$R/sys"', 'mount -o remount,bind,ro "$R/sys"']
    for m in mounts:
        # The mount point is made in the container's writable layer, as a runtime makes it, and resolved
        # inside the root: a symlink in the image must not lead the bind out onto the host.
        point = root / in_root(root, m.target).lstrip("/")
        point.mkdir(parents=True, exist_ok=True)
        lines.append(f"mount --bind {shlex.quote(str(m.source))} {shlex.quote(str(point))}")
        if m.read_only:
            lines.append(f"mount -o remount,bind,ro {shlex.quote(str(point))}")
    strace = [shutil.which("strace") or "strace", "-f", "-qq", "--seccomp-bpf", "-y", "-s", "4096",
              "-e", "trace=%file,bind", "-e", "signal=none", "-o", '"$T"']
    lines.append(f'exec {" ".join(strace)} {shutil.which("chroot") or "chroot"} "$R" "$@"')
    return [shutil.which("unshare") or "unshare", "--mount", "--propagation", "private",
            "/bin/sh", "-c", "\n".join(lines), "container", str(root), str(trace), *argv]


WRITE_CALLS = {"creat", "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2",
               "link", "linkat", "symlink", "symlinkat", "chmod", "fchmodat", "chown", "lchown", "fchownat",
               "truncate", "utime", "utimes", "utimensat", "futimesat", "mknod", "mknodat", "setxattr",
               "lsetxattr", "removexattr", "lremovexattr", "bind"}
OPEN_CALLS = {"open", "openat", "openat2"}
LINK_CALLS = {"symlink", "symlinkat", "link", "linkat"}
WRITE_FLAGS = re.compile(r"\bO_(WRONLY|RDWR|CREAT|TRUNC|APPEND)\b")
CALL = re.compile(r"^(?:\d+ +)?(\w+)\((.*?)(?:\) += .*| <unfinished \.\.\.>)$")
DIRFD = re.compile(r"^(?:\d+|AT_FDCWD)<(.*?)>, ")
STRING = re.compile(r'(sun_path=@?)?"((?:[^"\\]|\\.)*)"')  # sun_path=@"...": abstract, no file


def write_attempts(trace: Path, root: Path) -> list[Write]:
    """Every call in the strace log that would create, change or remove a file, whatever it returned."""
    found = []
    for line in trace.read_text(errors="replace").splitlines():
        m = CALL.match(line)
        if m is None:
            continue
        call, args = m.groups()
        if call not in WRITE_CALLS and not (call in OPEN_CALLS and WRITE_FLAGS.search(args)):
            continue
        base = "/"
        fd = DIRFD.match(args)
        if fd and call != "bind":
            # -y shows a directory fd (and the cwd) as the tracer sees it: a host path under the root.
            host = fd.group(1)
            base = host[len(str(root)):] or "/" if host.startswith(str(root)) else f"<outside the root>{host}"
        strings = STRING.findall(args)
        if call == "bind":
            strings = [s for s in strings if s[0] == "sun_path="]  # an IP address binds no file
        elif call in LINK_CALLS:
            strings = strings[-1:]  # the new name is written; the target (or the linked file) is not
        for _, raw in strings:
            path = raw.encode("latin-1", "backslashreplace").decode("unicode_escape")
            joined = path if path.startswith("/") else f"{base.rstrip('/')}/{path}"
            found.append(Write(call, joined if joined.startswith("<") else in_root(root, joined)))
    return found


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    writes: list[Write]
    seconds: float

    def describe(self) -> str:
        return (f"exit {self.returncode} after {self.seconds:.1f}s\n--- stdout ---\n{_tail(self.stdout)}\n"
                f"--- stderr ---\n{_tail(self.stderr)}\n--- write attempts ---\n"
                + "\n".join(f"{w.syscall} {w.path}" for w in self.writes))


def run(root: Path, argv: Sequence[str], *, env: dict[str, str], mounts: Sequence[Mount] = (),
        timeout: float = 180) -> Result:
    """Run ``argv`` to completion in the read-only container (see container_command)."""
    with tempfile.TemporaryDirectory(prefix="image-trace-") as tmp:
        trace = Path(tmp) / "strace.log"
        started = time.monotonic()
        proc = subprocess.run(container_command(root, mounts, argv, trace), env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)
        seconds = time.monotonic() - started
        return Result(proc.returncode, proc.stdout, proc.stderr, write_attempts(trace, root), seconds)


def traced_child(pid: int) -> int:
    """The container's main process: strace's (``pid``'s) only child."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise ImageError(f"expected strace (pid {pid}) to have one child, found {children}")
    return int(children[0])


def elf_machine(path: Path) -> int:
    """e_machine of an ELF file (little-endian): which CPU it is built for."""
    header = path.read_bytes()[:20]
    if header[:4] != b"\x7fELF":
        raise ImageError(f"{path} is not an ELF file")
    return int.from_bytes(header[18:20], "little")


# Filled by the fixtures and tests, printed at the end of the session and kept in the cache.
MEASURED: dict[str, object] = {}
