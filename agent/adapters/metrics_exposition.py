"""The Prometheus text exposition format (0.0.4), written by hand because a scrape is on the hot path.

prometheus_client's generate_latest validates and escapes every label name and value and writes the
OpenMetrics-only _created series. Our label names come from our own code (already valid), so only
label values are escaped, and only when they hold a character that needs it. At 2 PFs x 127 VFs
(~2400 samples) that is 4 ms against generate_latest's 10 ms, out of ~27 ms of CPU per scrape
(BENCHMARKS.md#metrics); a unit test checks both parse to the same samples.

Nothing here imports prometheus_client at run time: it formats whatever a registry's collect() yields.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what render_text writes

# Metric family type -> (suffix of the exposed name, type on the TYPE line), as generate_latest maps them.
_TYPE_SUFFIX = {"counter": ("_total", "counter"), "info": ("_info", "gauge"), "stateset": ("", "gauge"),
                "unknown": ("", "untyped"), "gaugehistogram": ("", "histogram")}
_OPENMETRICS_ONLY = ("_created", "_gsum", "_gcount")


def render_text(registry: Collector) -> bytes:
    """Every family ``registry`` collects, in the text format generate_latest writes, minus _created."""
    out: list[str] = []
    for metric in registry.collect():
        suffix, mtype = _TYPE_SUFFIX.get(metric.type, ("", metric.type))
        name = metric.name + suffix
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {mtype}\n")
        skip = tuple(metric.name + s for s in _OPENMETRICS_ONLY)
        for sample in metric.samples:
            if sample.name in skip:
                continue
            if sample.labels:
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(sample.labels.items()))
                out.append(f"{sample.name}{{{labels}}} {_value(sample.value)}\n")
            else:
                out.append(f"{sample.name} {_value(sample.value)}\n")
    return "".join(out).encode()


def _value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if v in (math.inf, -math.inf):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
    return value
