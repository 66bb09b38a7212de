"""Facts about the host outside sysfs: which filesystem a path lives on (/proc/self/mountinfo) and the
running kernel's release. Read-only, for `sriov-rdma-agent doctor`."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    options: frozenset[str]  # per-mount options: "ro"/"rw", "nosuid", ...

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 6:
            continue
        mounts.append(Mount(_unescape(fields[4]), right.split()[0], frozenset(fields[5].split(","))))
    return mounts


def mount_of(path: str, mountinfo: str | None = None) -> Mount | None:
    """The mount a path lives on: the last-mounted entry whose mount point is the longest prefix."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo") as f:
                mountinfo = f.read()
        except OSError:
            return None
    real = os.path.realpath(path)
    best: Mount | None = None
    for m in parse_mountinfo(mountinfo):
        mp = m.mount_point.rstrip("/") or "/"
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (
                best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/")):
            best = m
    return best


def is_real_sysfs(sysfs_root: str, mountinfo: str | None = None) -> bool:
    """Is <root>/sys the kernel's own sysfs (a mount of type sysfs: "/" on a node, "/host" in the pod),
    not a drawn tree?"""
    m = mount_of(os.path.join(sysfs_root, "sys"), mountinfo)
    return m is not None and m.fstype == "sysfs"


def kernel_release() -> str | None:
    try:
        with open("/proc/sys/kernel/osrelease") as f:
            return f.read().strip()
    except OSError:
        return None
