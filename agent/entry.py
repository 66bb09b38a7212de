"""The process entry point (`sriov-rdma-agent`, `python -m agent`): start-up without the collector.

Importing grpc, protobuf, prometheus_client and the agent creates tens of thousands of objects
that live as long as the process. With the collector on, the interpreter scans them again and again
while they are created (~20 % of import time) and, in every later full collection, once more
(~9 ms each, a pause on whatever request is in flight). So: collector off while importing, then
the survivors are frozen (never scanned again) and the collector is back on for everything else.
"""

from __future__ import annotations

import gc


def main() -> int:
    gc.disable()
    try:
        from agent import cli  # noqa: PLC0415 (the point: import with the collector off)
    finally:
        gc.freeze()
        gc.enable()
    return cli.main()
