"""Fixtures for the observability tests (helpers live in obs_node.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from obs_node import Node, make_node


@pytest.fixture
def node(tmp_path: Path) -> Node:
    n = make_node(tmp_path)
    n.rescan()
    return n
