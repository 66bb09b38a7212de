"""Shared fixtures for the deployment tier: the Kustomize renders, read once per session."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "daemonset"
EXAMPLES = BASE / "examples"

Obj = dict[str, Any]


def kustomize(directory: Path) -> list[Obj]:
    """`kubectl kustomize <dir>` parsed into objects; fails the test with kubectl's own message."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found: scripts/setup-tools.sh installs it (scripts/debian-tools.txt)")
    proc = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def only(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


@pytest.fixture(scope="session")
def base() -> list[Obj]:
    return kustomize(BASE)


@pytest.fixture(scope="session")
def examples() -> list[Obj]:
    return kustomize(EXAMPLES)
