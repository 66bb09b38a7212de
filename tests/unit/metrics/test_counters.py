"""Event counters are declared once (agent.stats.COUNTERS): every declared one reaches a real scrape,
every one the agent counts is declared, and the docs list exactly that set."""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path

import pytest
from obs_node import make_node
from prometheus_client.parser import text_string_to_metric_families

from agent.adapters.metrics_server import MetricsServer
from agent.errors import UndeclaredCounterError
from agent.stats import COUNTERS, Stats

REPO = Path(__file__).resolve().parents[3]
AGENT = REPO / "agent"
OBSERVABILITY_DOC = REPO / "docs/observability.md"


def test_an_undeclared_counter_fails_at_its_first_use() -> None:
    stats = Stats()
    with pytest.raises(UndeclaredCounterError) as err:
        stats.inc("config_reload", result="ok")  # a typo of config_reloads
    assert err.value.counter == "config_reload" and "'config_reload' is not declared" in str(err.value)
    with pytest.raises(UndeclaredCounterError):
        stats.get("config_reload", result="ok")
    with pytest.raises(UndeclaredCounterError):
        list(stats.series("config_reload"))


@pytest.mark.parametrize("labels", [{"pf": "0002:01:00.0"},
                                    {"pf": "0002:01:00.0", "reason": "EBUSY", "resource": "r"},
                                    {"pf": "0002:01:00.0", "cause": "EBUSY"}],
                         ids=["missing", "extra", "misnamed"])
def test_a_wrong_label_set_fails_naming_the_counter_and_its_labels(labels: dict[str, str]) -> None:
    stats = Stats()
    with pytest.raises(UndeclaredCounterError) as err:
        stats.inc("reconcile_errors", **labels)
    assert err.value.counter == "reconcile_errors" and err.value.declared == ("pf", "reason")
    assert "'reconcile_errors' declares labels (pf, reason)" in str(err.value)
    assert list(stats.series("reconcile_errors")) == []  # nothing was counted


def test_counts_are_kept_per_label_set_in_declared_order() -> None:
    stats = Stats()
    stats.inc("vf_resets", outcome="ok", pf="0002:01:00.0", mode="flr")  # keyword order does not matter
    stats.inc("vf_resets", pf="0002:01:00.0", mode="flr", outcome="ok")
    stats.inc("vf_resets", pf="0002:01:00.0", mode="flr", outcome="failed", amount=3)
    assert stats.get("vf_resets", mode="flr", pf="0002:01:00.0", outcome="ok") == 2
    assert list(stats.series("vf_resets")) == [(("0002:01:00.0", "flr", "failed"), 3.0),
                                               (("0002:01:00.0", "flr", "ok"), 2.0)]


def test_every_declared_counter_is_served_by_the_real_endpoint(tmp_path: Path) -> None:
    """Each counter, incremented once, is in a scrape of the HTTP endpoint with its HELP, TYPE and
    labels, and parses as a Prometheus counter with that value."""
    node = make_node(tmp_path)
    metrics = node.agent.metrics
    assert metrics is not None
    for spec in COUNTERS.values():
        node.agent.stats.inc(spec.name, **{label: f"{spec.name}-{label}" for label in spec.labels})

    async def scrape() -> str:
        server = MetricsServer("127.0.0.1:0", metrics)
        port = await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: agent\r\n\r\n")
            await writer.drain()
            response = await asyncio.wait_for(reader.read(), 30)
            writer.close()
        finally:
            await server.stop()
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        return body.decode()

    text = asyncio.run(scrape())
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for spec in COUNTERS.values():
        name = f"sriov_rdma_{spec.name}"
        assert f"# HELP {name}_total {spec.doc}\n# TYPE {name}_total counter\n" in text, name
        family = families[name]
        assert family.type == "counter" and family.documentation == spec.doc
        assert [(s.name, s.labels, s.value) for s in family.samples] == [
            (f"{name}_total", {label: f"{spec.name}-{label}" for label in spec.labels}, 1.0)]


# -------------------------------------------------------------------- every inc() in agent/ is declared

def inc_problems(source: str, filename: str) -> tuple[set[str], list[str]]:
    """Counter names passed to ``.inc(...)`` in ``source``, and every call that is undeclared, has the
    wrong labels, or cannot be checked here (a name that is not a literal, ``**labels``)."""
    names: set[str] = set()
    problems: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr != "inc":
            continue
        where = f"{filename}:{node.lineno}"
        first = node.args[0] if node.args else None
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            problems.append(f"{where}: counter name is not a string literal")
            continue
        name = first.value
        names.add(name)
        if any(k.arg is None for k in node.keywords):
            problems.append(f"{where}: {name}: labels passed as **mapping")
            continue
        spec = COUNTERS.get(name)
        labels = {k.arg for k in node.keywords if k.arg != "amount"}
        if spec is None:
            problems.append(f"{where}: {name} is not declared in agent.stats.COUNTERS")
        elif labels != set(spec.labels):
            problems.append(f"{where}: {name} takes labels {sorted(spec.labels)}, got {sorted(labels)}")
    return names, problems


def test_the_source_check_finds_what_it_must() -> None:
    source = """
stats.inc("reconcile_errors", pf=pf, reason=r)
self.agent.stats.inc("vf_resets", amount=2, pf=p, mode=m, outcome="ok")
stats.inc("config_reload", result="ok")
stats.inc("reconcile_errors", pf=pf)
stats.inc(name, reason="x")
stats.inc("netlink_resyncs", **labels)
"""
    names, problems = inc_problems(source, "example.py")
    assert names == {"reconcile_errors", "vf_resets", "config_reload", "netlink_resyncs"}
    assert problems == ["example.py:4: config_reload is not declared in agent.stats.COUNTERS",
                        "example.py:5: reconcile_errors takes labels ['pf', 'reason'], got ['pf']",
                        "example.py:6: counter name is not a string literal",
                        "example.py:7: netlink_resyncs: labels passed as **mapping"]


def test_every_counter_the_agent_counts_is_declared_and_every_declared_one_is_counted() -> None:
    used: set[str] = set()
    problems: list[str] = []
    for path in sorted(AGENT.rglob("*.py")):
        names, found = inc_problems(path.read_text(), str(path.relative_to(REPO)))
        used |= names
        problems += found
    assert problems == []
    assert used == set(COUNTERS), "declared but never counted: " + ", ".join(sorted(set(COUNTERS) - used))


# -------------------------------------------------------------------- the docs list the declared set

def documented_counters() -> dict[str, tuple[str, ...]]:
    """``counter`` rows of the metric tables in docs/observability.md: name -> label names."""
    rows: dict[str, tuple[str, ...]] = {}
    for line in OBSERVABILITY_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1] == "counter":
            (name,) = re.findall(r"`(sriov_rdma_[a-z_]+)_total`", cells[0])
            rows[name] = tuple(re.findall(r"`([a-z_]+)`", re.sub(r"\(.*?\)", "", cells[2])))
    return rows


def test_the_docs_list_exactly_the_declared_counters() -> None:
    assert documented_counters() == {f"sriov_rdma_{c.name}": c.labels for c in COUNTERS.values()}
