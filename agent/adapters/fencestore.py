"""The VFs fenced for a reset, on disk, so a restarted agent finishes what the last one started.

One small JSON file in --state-dir (default /var/run/sriov-rdma-agent: tmpfs, so a reboot, which
recreates every VF, forgets it too). Written whole, to a temporary name renamed into place, so a
crash mid-write leaves the previous version. A file that cannot be read or written is logged and
the agent goes on: the fence in memory still protects the VF until the agent restarts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from agent.logs import ctx

log = logging.getLogger(__name__)

FILE_NAME = "fenced-vfs.json"


class FenceStore:
    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._last: dict[str, str] | None = None

    def load(self) -> dict[str, str]:
        """VF PCI address -> PF PCI address of every VF left fenced; {} when there is none."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("cannot read the fenced-VF file; VFs a previous run left fenced are not reset "
                      "again: %s", e, extra=ctx("fence-load", str(self.path)))
            return {}
        vfs = raw.get("vfs") if isinstance(raw, dict) else None
        if not isinstance(vfs, dict):
            log.error("fenced-VF file has no 'vfs' mapping; ignored", extra=ctx("fence-load", str(self.path)))
            return {}
        self._last = {str(k): str(v) for k, v in vfs.items()}
        return dict(self._last)

    def save(self, fenced: Mapping[str, str]) -> None:
        """Replace the file with ``fenced`` (VF -> PF); skipped when nothing changed."""
        want = dict(sorted(fenced.items()))
        if want == self._last:
            return
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"vfs": want}, indent=1) + "\n")
            tmp.replace(self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.error("cannot write the fenced-VF file (a restart would not finish these resets: %s): %s",
                      ", ".join(want) or "none", e, extra=ctx("fence-save", str(self.path)))
            return
        self._last = want
