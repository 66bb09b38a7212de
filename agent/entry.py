"""The process entry point (`sriov-rdma-agent`, `python -m agent`): start-up without the collector.

Importing grpc, protobuf, prometheus_client and the agent creates tens of thousands of objects
that live as long as the process. With the collector on, the interpreter scans them again and again
while they are created (~20 % of import time) and, in every later full collection, once more
(~9 ms each, a pause on whatever request is in flight). So: collector off while importing, then
the survivors are frozen (never scanned again) and the collector is back on for everything else.
"""

from __future__ import annotations

import gc
import signal
from types import FrameType

# A SIGHUP before `serve` has its handler (the imports, the first config read) would end the process,
# which is SIGHUP's default: it is remembered here instead, and `serve` reloads once it can.
_early_sighup = False


def _remember_sighup(signum: int, frame: FrameType | None) -> None:
    global _early_sighup  # noqa: PLW0603 (set from a signal handler: a flag is all it may touch)
    _early_sighup = True


def take_early_sighup() -> bool:
    """Was a SIGHUP delivered before `serve` installed its own handler? (Asking clears it.)"""
    global _early_sighup
    seen, _early_sighup = _early_sighup, False
    return seen


def main() -> int:
    signal.signal(signal.SIGHUP, _remember_sighup)
    gc.disable()
    try:
        from agent import cli  # noqa: PLC0415 (the point: import with the collector off)
    finally:
        gc.freeze()
        gc.enable()
    return cli.main()
