"""Fixtures for the observability tests (helpers live in obs_node.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from obs_node import Node, make_node


@pytest.fixture
def node(tmp_path: Path) -> Node:
    n = make_node(tmp_path)
    n.rescan()
    return n


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A short directory: unix socket paths must stay under 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="obs-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
