"""Retrying while the queue backend is unreachable: exponential backoff, one log line per outage."""
from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("dynabatch.queue")


class Backoff:
    """Exponential backoff between retries while the queue is unreachable (logs once per outage)."""

    def __init__(self, first_s: float = 0.05, max_s: float = 1.0) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.delay = 0.0
        self.since: float | None = None

    async def wait(self, error: Exception, what: str) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s: queue unavailable (%s); retrying with backoff", what, _why(error))
        self.delay = min(self.max_s, self.delay * 2 if self.delay else self.first_s)
        await asyncio.sleep(self.delay)

    def ok(self, what: str) -> None:
        if self.since is not None:
            log.warning("%s: queue reachable again after %.1f s", what, time.monotonic() - self.since)
        self.delay, self.since = 0.0, None

    def down_for(self) -> float:
        """Seconds since the current outage began (0 when the queue is reachable)."""
        return 0.0 if self.since is None else time.monotonic() - self.since


def _why(error: Exception) -> str:
    """The error and what caused it (e.g. "Connection reset by peer" from a TLS-only port):
    the cause is what an operator needs; clients get only the short message."""
    cause = error.__cause__
    return f"{error}: {cause}" if cause is not None and str(cause) else str(error)
