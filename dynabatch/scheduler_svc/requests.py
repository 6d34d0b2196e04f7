"""Requests the scheduler is serving: their client streams, offsets and timings.

Delivery is idempotent: a delta whose tokens were already relayed (a re-run after preemption or a
worker crash) is trimmed by offset, so a client never sees a token twice. A request's output is a
log that client streams follow from an offset: Generate from 0, Resume from where a broken
stream stopped; a stream that fell behind gets everything new in one message.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from dynabatch.scheduler_svc.detok import IncrementalDetokenizer
from dynabatch.v1.scheduler_pb2 import FinishReason, GenerateResponse, Timings
from dynabatch.v1.worker_pb2 import TokenDelta, WorkItem

UNSPECIFIED = FinishReason.FINISH_REASON_UNSPECIFIED    # (enum lookups by name are slow)


@dataclass(frozen=True)
class Failure:
    """Ends a stream with an RPC error."""
    code: grpc.StatusCode
    message: str


@dataclass
class Tracked:
    item: WorkItem
    arrival: float                                   # time.monotonic() at arrival
    output: list[int] = field(default_factory=list)  # every token relayed so far
    worker_id: str | None = None
    assigned_at: float | None = None
    first_token_at: float | None = None
    first_step_end_ns: int = 0                       # Unix ns: end of the first token's step
    last_token_at: float | None = None
    finish_reason: int = 0                           # FinishReason once finished
    final_timings: Timings | None = None
    failure: Failure | None = None                   # ends every stream with this status
    detached: Failure | None = None                  # ends the streams only (request lives on)
    detached_gen: int = 0                            # streams started before a detach end
    streams: int = 0                                 # client streams following it now
    policy_view: tuple | None = None                 # (key, Assigned): batching's cache
    _listeners: set[asyncio.Future] = field(default_factory=set)   # streams waiting for news
    _pauses: set[asyncio.Future] = field(default_factory=set)   # streams between messages

    @property
    def finished(self) -> bool:
        return bool(self.finish_reason) or self.failure is not None

    def accept(self, delta: TokenDelta, now: float, step_end_ns: int = 0) -> bool:
        """Add a worker's delta to the output; False if it brought nothing new."""
        new = self._add(delta.offset, delta.token_ids, now, step_end_ns)
        if new < 0:
            raise ValueError(f"gap in {self.item.request_id}: expected offset {len(self.output)}, "
                             f"got {delta.offset}")
        final = delta.finish_reason != UNSPECIFIED
        if final:
            self.finish_reason = delta.finish_reason
            self.final_timings = self.timings(now)
            self._end_pauses()
        if not new and not final:
            return False
        self._notify()
        return True

    def add(self, offset: int, token_ids, now: float, step_end_ns: int = 0) -> int:
        """Tokens from `offset` that do not end the request (the relay's common case): how many
        were new, -1 on a gap (nothing added). `step_end_ns`: when the worker's step that made
        them ended (TokenDeltaBatch.step_end_unix_ns)."""
        new = self._add(offset, token_ids, now, step_end_ns)
        if new > 0:
            self._notify()
        return new

    def _add(self, offset: int, token_ids, now: float, step_end_ns: int = 0) -> int:
        skip = len(self.output) - offset
        if skip < 0:
            return -1
        new = len(token_ids) - skip
        if new <= 0:
            return 0
        self.output.extend(token_ids[skip:] if skip else token_ids)
        if self.first_token_at is None:
            self.first_token_at, self.first_step_end_ns = now, step_end_ns
        self.last_token_at = now
        return new

    def fail(self, failure: Failure) -> None:
        self.failure = failure
        self._end_pauses()
        self._notify()

    def detach(self, why: Failure) -> None:
        """End the client streams (they may Resume), keep the request."""
        self.detached, self.detached_gen = why, self.detached_gen + 1
        self._end_pauses()
        self._notify()

    def _notify(self) -> None:
        for waiter in self._listeners:
            resolve(waiter)

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds` between two messages of a stream, or less if the request ends
        meanwhile: its last message is never held back by the coalescing window."""
        loop = asyncio.get_running_loop()
        pause = loop.create_future()
        timer = loop.call_later(seconds, resolve, pause)
        self._pauses.add(pause)
        try:
            await pause
        finally:
            timer.cancel()
            self._pauses.discard(pause)

    def _end_pauses(self) -> None:
        for pause in self._pauses:
            resolve(pause)

    async def follow(self, offset: int, tokenizer=None,
                     min_interval_s: float = 0.0) -> AsyncIterator[GenerateResponse | Failure]:
        """The stream from `offset`: everything new per message, the final one with timings; a
        Failure last if the request failed or the stream was detached. Messages are at least
        `min_interval_s` apart: when steps are faster than that, tokens are coalesced (one gRPC
        message per window instead of one per step); when they are slower it costs nothing."""
        loop = asyncio.get_running_loop()
        detok = IncrementalDetokenizer(tokenizer, self.output[:offset]) if tokenizer else None
        pos, gen = offset, self.detached_gen
        while True:
            n, done = len(self.output), bool(self.finish_reason)
            if done and pos > n:
                yield Failure(grpc.StatusCode.INVALID_ARGUMENT,
                              f"offset: {pos} is past the end of the output ({n} tokens)")
                return
            if n > pos or done:
                yield self._message(pos, n, detok, done)
                pos = n
                if done:
                    return
                if min_interval_s:
                    await self._pause(min_interval_s)
                continue
            if self.failure or self.detached_gen != gen:
                yield self.failure or self.detached
                return
            waiter = loop.create_future()       # made after the checks: no news is missed
            self._listeners.add(waiter)
            try:
                await waiter
            finally:
                self._listeners.discard(waiter)

    def _message(self, start: int, end: int, detok, final: bool) -> GenerateResponse:
        new = self.output[start:end]
        text = detok.add(new, final=final) if detok else ""
        msg = GenerateResponse(request_id=self.item.request_id, token_ids=new, text=text,
                               offset=start)
        if final:
            msg.finish_reason = self.finish_reason
            msg.timings.CopyFrom(self.final_timings)
        return msg

    def timings(self, now: float) -> Timings:
        n = len(self.output)
        first, last = self.first_token_at, self.last_token_at
        ms = lambda a, b: (b - a) * 1000 if a is not None and b is not None else 0.0  # noqa: E731
        wall = time.time_ns() - round(time.monotonic() * 1e9)      # monotonic -> Unix ns
        unix = lambda t: wall + round(t * 1e9) if t is not None else 0  # noqa: E731
        return Timings(queue_ms=ms(self.arrival, self.assigned_at), ttft_ms=ms(self.arrival, first),
                       tpot_ms=ms(first, last) / (n - 1) if n > 1 else 0.0,
                       total_ms=ms(self.arrival, last or now),
                       prompt_tokens=len(self.item.prompt_token_ids), output_tokens=n,
                       arrival_unix_ns=unix(self.arrival), first_token_unix_ns=unix(first),
                       first_step_end_unix_ns=self.first_step_end_ns)


def resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class RequestTable:
    """All requests this scheduler relays, by id, and the recently ended ones (for Resume)."""

    RECENT_KEEP = 2048          # ended requests kept for a late Resume...
    RECENT_TTL_S = 60.0         # ...for at most this long

    def __init__(self, on_end: Callable[[Tracked, str], None] | None = None) -> None:
        self.on_end = on_end        # told of every request that ends, with its outcome
        self.by_id: dict[str, Tracked] = {}
        self.recent: OrderedDict[str, tuple[float, Tracked]] = OrderedDict()
        self.counts = {"completed": 0, "rejected": 0, "cancelled": 0, "failed": 0}

    def add(self, item: WorkItem, output: list[int] | None = None) -> Tracked:
        tracked = Tracked(item=item, arrival=time.monotonic(), output=list(output or []))
        self.by_id[item.request_id] = tracked
        return tracked

    def get(self, request_id: str) -> Tracked | None:
        return self.by_id.get(request_id)

    def find(self, request_id: str) -> Tracked | None:
        """A live request, or one that ended recently."""
        tracked = self.by_id.get(request_id)
        if tracked is None and request_id in self.recent:
            tracked = self.recent[request_id][1]
        return tracked

    def end(self, request_id: str, outcome: str, failure: Failure | None = None) -> Tracked | None:
        """Forget a request; with a failure, its client streams end with that status."""
        tracked = self.by_id.pop(request_id, None)
        if tracked is None:
            return None
        self.counts[outcome] += 1
        if failure is not None:
            tracked.fail(failure)
        if self.on_end is not None:
            self.on_end(tracked, outcome)
        self._remember(request_id, tracked)
        return tracked

    def _remember(self, request_id: str, tracked: Tracked) -> None:
        now = time.monotonic()
        self.recent[request_id] = (now, tracked)
        while self.recent and (len(self.recent) > self.RECENT_KEEP
                               or next(iter(self.recent.values()))[0] < now - self.RECENT_TTL_S):
            self.recent.popitem(last=False)

    def detach_all(self, why: Failure) -> None:
        for tracked in self.by_id.values():
            tracked.detach(why)

    def on_worker(self, worker_id: str) -> list[Tracked]:
        return [t for t in self.by_id.values() if t.worker_id == worker_id and not t.finished]
