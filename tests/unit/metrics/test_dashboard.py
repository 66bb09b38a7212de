"""The shipped Grafana dashboard only uses metric names the agent really exports."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from obs_node import RESOURCE, Node

from agent.adapters.metrics_exposition import render_text
from agent.stats import COUNTERS

DASHBOARD = Path(__file__).resolve().parents[3] / "daemonset/grafana-dashboard.yaml"


def dashboard_exprs() -> list[str]:
    cm = yaml.safe_load(DASHBOARD.read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (body,) = cm["data"].values()
    dash: dict[str, Any] = json.loads(body)
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_every_dashboard_metric_is_exported(node: Node) -> None:
    assert node.agent.metrics is not None
    node.agent.metrics.allocate_observer(RESOURCE)(0.001, True)
    for spec in COUNTERS.values():
        node.agent.stats.inc(spec.name, **dict.fromkeys(spec.labels, "x"))
    node.agent.plugins.lifecycles[RESOURCE] = SimpleNamespace(registered=True)  # type: ignore[assignment]
    asyncio.run(node.agent.metrics.collector.refresh_pods())
    exported = set(re.findall(r"^([a-z_]+)[{ ]", render_text(node.agent.metrics.registry).decode(), re.M))
    used = {name for e in dashboard_exprs() for name in re.findall(r"\b((?:sriov_rdma|process)_[a-z_]+)", e)}
    assert len(used) >= 25
    assert used - exported == set()
