"""Structured logging: every line carries the action and the device it concerns."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

# Keys callers put in `extra=` that belong in every structured line.
CONTEXT_KEYS = ("action", "device", "pf", "vf", "resource", "reason", "errno")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_KEYS:
            val = getattr(record, key, None)
            if val is not None:
                out[key] = val
        extra = getattr(record, "fields", None)
        if isinstance(extra, Mapping):
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = " ".join(
            f"{k}={getattr(record, k)}" for k in CONTEXT_KEYS if getattr(record, k, None) is not None
        )
        extra = getattr(record, "fields", None)
        if isinstance(extra, Mapping):
            ctx = " ".join(filter(None, [ctx, *(f"{k}={v}" for k, v in extra.items())]))
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.getMessage()}"
        line = f"{base}  [{ctx}]" if ctx else base
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(fmt: str = "text", level: str = "info", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and pyroute2 are chatty at debug; their detail is rarely the device's story.
    logging.getLogger("pyroute2").setLevel(max(root.level, logging.WARNING))


def ctx(action: str, device: str | None = None, **fields: Any) -> dict[str, Any]:
    """Build the `extra=` dict for a log call: log.info("...", extra=ctx("allocate", vf))."""
    extra: MutableMapping[str, Any] = {"action": action}
    if device is not None:
        extra["device"] = device
    for k, v in fields.items():
        if k in CONTEXT_KEYS:
            extra[k] = v
    others = {k: v for k, v in fields.items() if k not in CONTEXT_KEYS}
    if others:
        extra["fields"] = others
    return dict(extra)
