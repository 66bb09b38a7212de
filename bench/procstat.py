"""What the bench scripts read about a running agent process: a free port, CPU time, memory; and
the bytecode it starts from."""

from __future__ import annotations

import compileall
import os
import re
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, name: str) -> int:
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    match = re.search(rf"{name}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert match is not None, name
    return int(match.group(1))


def compile_agent(tree: Path) -> None:
    """Write the bytecode of ``tree``'s agent package, as the image's pip install does.

    A checkout run in place (editable install, a worktree) under PYTHONDONTWRITEBYTECODE=1 (as on
    the dev machines and in the image) would otherwise compile every agent module from source at each start:
    ~50 ms of a ~200 ms start-up that no node pays, while the dependencies, installed by pip, start
    from bytecode. Stale files are rewritten; Python checks each source's mtime anyway."""
    if not compileall.compile_dir(str(tree / "agent"), quiet=1):
        raise RuntimeError(f"cannot compile {tree / 'agent'}")
