"""One guard for every event callback and root task: a failure is logged, counted and retried.

A uevent, a netlink batch, a timer tick, a config change or a plugin server may meet a surprise
(a rescan that raises, a directory that cannot be created). Whatever it is, it must never reach
the loop that delivered the event: that would end the agent, and with it every socket, metric and
health answer. The guard retries the same call after a capped doubling delay and logs each
distinct reason once; the retry re-reads the node, so an event missed meanwhile is not lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec

from agent.errors import AgentError
from agent.logs import ctx
from agent.stats import Stats

log = logging.getLogger(__name__)

P = ParamSpec("P")

FIRST_RETRY_S = 0.1
MAX_RETRY_S = 30.0
STABLE_S = 1.0  # a retried call that keeps running this long counts as recovered
MAX_REASON = 300  # characters of an error kept in a log line or a health reason


def guarded(what: str, fn: Callable[P, Awaitable[None]], stats: Stats | None = None, *,
            report: Callable[[str], None] | None = None,
            max_delay: float = MAX_RETRY_S) -> Callable[P, Coroutine[Any, Any, None]]:
    """``fn`` wrapped so that an exception is logged once per reason, counted as
    ``callback_errors{callback=what}``, passed to ``report`` (health) and retried with backoff.

    ``report("")`` follows once a retried call returns or has kept running for STABLE_S (a root
    task that never returns). Cancellation passes through untouched.
    """
    async def run(*args: P.args, **kwargs: P.kwargs) -> None:
        loop = asyncio.get_running_loop()
        delay = FIRST_RETRY_S
        last = ""
        while True:
            recovered = loop.call_later(STABLE_S, report, "") if last and report else None
            started = loop.time()
            try:
                await fn(*args, **kwargs)
            except Exception as e:
                if recovered is not None:
                    recovered.cancel()
                if loop.time() - started > max_delay:
                    delay = FIRST_RETRY_S  # it ran well for a long time: this is a new failure
                reason = f"{type(e).__name__}: {e}"[:MAX_REASON]
                if stats is not None:
                    stats.inc("callback_errors", callback=what)
                if reason != last:
                    log.error("%s failed; retrying with backoff: %s", what, reason,
                              exc_info=not isinstance(e, AgentError | OSError),
                              extra=ctx("guard", what, reason=reason))
                    if report is not None:
                        report(reason)
                last = reason
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_delay)
                continue
            if last:
                if recovered is not None:
                    recovered.cancel()
                if report is not None:
                    report("")
                log.info("%s recovered", what, extra=ctx("guard", what))
            return
    return run
