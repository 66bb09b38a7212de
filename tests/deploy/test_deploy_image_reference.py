"""One image reference everywhere: what `make image` builds (and pushes) by default is what the rendered
DaemonSet runs, for this version, and the install guide names it."""

from __future__ import annotations

import re
import tomllib

from .conftest import REPO, Obj
from .test_deploy_manifests import agent_container


def test_make_image_builds_what_the_daemonset_runs(base: list[Obj]) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    script = (REPO / "scripts/image/build.sh").read_text()
    (default,) = re.findall(r'^image="\$\{IMAGE:-([^}]+)\}"$', script, re.M)
    assert default.replace("$version", version) == agent_container(base)["image"]


def test_install_guide_names_the_daemonsets_image(base: list[Obj]) -> None:
    image = agent_container(base)["image"]
    assert f"`{image}`" in (REPO / "docs/install-talos.md").read_text()
