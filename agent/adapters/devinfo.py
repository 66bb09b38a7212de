"""The device-info directory Multus reads: one JSON file per VF, mode 0444.

Files are replaced atomically (written under a temporary name, then renamed over the old one),
so Multus reading at any moment finds the old file or the new one, never none.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.errors import DevinfoError

MODE = 0o444


@dataclass
class SyncResult:
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    problems: list[DevinfoError] = field(default_factory=list)


def _tmp_name(name: str) -> str:
    return f".{name}.tmp"


class DevinfoDir:
    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, files: Mapping[str, str]) -> None:
        """Create or replace each file. Raises DevinfoError naming the first that fails."""
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise DevinfoError(self.path, f"cannot create the directory: {e.strerror}") from e
        for name, content in files.items():
            self._write_one(name, content)

    def _write_one(self, name: str, content: str) -> None:
        path = os.path.join(self.path, name)
        tmp = os.path.join(self.path, _tmp_name(name))
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # left by a write that died half-way
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, MODE)
            try:
                data = content.encode()
                while data:
                    data = data[os.write(fd, data):]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            raise DevinfoError(path, f"cannot write: {e.strerror}") from e

    def _current(self, name: str) -> str | None:
        """The file's content if it is a regular 0444 file, else None (it must be rewritten)."""
        path = os.path.join(self.path, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != MODE:
                return None
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError):  # missing or unreadable: write it
            return None

    def sync(self, want: Mapping[str, str], ours: Callable[[str], bool]) -> SyncResult:
        """Make the directory hold exactly ``want`` among the files ``ours`` claims: write each
        one missing or different, remove each of ours not wanted. Other files are left alone.
        Every file is tried; the ones that failed are returned, not raised."""
        result = SyncResult()
        try:
            os.makedirs(self.path, exist_ok=True)
            present = os.listdir(self.path)
        except OSError as e:
            result.problems.append(DevinfoError(self.path, f"cannot list the directory: {e.strerror}"))
            return result
        for name, content in want.items():
            if self._current(name) == content:
                continue
            try:
                self._write_one(name, content)
            except DevinfoError as e:
                result.problems.append(e)
                continue
            result.written.append(name)
        for entry in present:
            name = entry[1:-len(".tmp")] if entry.startswith(".") and entry.endswith(".tmp") else entry
            if not ours(name) or entry in want:
                continue
            try:
                os.unlink(os.path.join(self.path, entry))
            except FileNotFoundError:
                continue
            except OSError as e:
                result.problems.append(DevinfoError(os.path.join(self.path, entry),
                                                    f"cannot remove: {e.strerror}"))
                continue
            result.removed.append(entry)
        return result
