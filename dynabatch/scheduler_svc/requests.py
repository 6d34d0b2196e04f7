"""Requests the scheduler is serving: their client streams, offsets and timings.

Delivery is idempotent: a delta whose tokens were already relayed (a re-run after preemption or a
worker crash) is trimmed by offset, so a client never sees a token twice.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from dynabatch.scheduler_svc.detok import IncrementalDetokenizer
from dynabatch.v1.scheduler_pb2 import FinishReason, GenerateResponse, Timings
from dynabatch.v1.worker_pb2 import TokenDelta, WorkItem


@dataclass(frozen=True)
class Failure:
    """Ends a stream with an RPC error."""
    code: grpc.StatusCode
    message: str


@dataclass
class Tracked:
    item: WorkItem
    arrival: float                                   # time.monotonic() at arrival
    tokenizer: object | None                         # None when the client skipped text
    stream: asyncio.Queue = field(default_factory=asyncio.Queue)
    output: list[int] = field(default_factory=list)  # every token relayed so far
    worker_id: str | None = None
    assigned_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished: bool = False
    detok: IncrementalDetokenizer | None = None

    def __post_init__(self) -> None:
        if self.tokenizer is not None:
            self.detok = IncrementalDetokenizer(self.tokenizer)

    def accept(self, delta: TokenDelta, now: float) -> GenerateResponse | None:
        """Turn a worker's delta into the client's next message (None if nothing new)."""
        skip = len(self.output) - delta.offset
        if skip < 0:
            raise ValueError(f"gap in {self.item.request_id}: expected offset {len(self.output)}, "
                             f"got {delta.offset}")
        new = list(delta.token_ids[skip:])
        final = delta.finish_reason != FinishReason.FINISH_REASON_UNSPECIFIED
        if not new and not final:
            return None
        offset = len(self.output)
        self.output.extend(new)
        if new:
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
        text = self.detok.add(new, final=final) if self.detok else ""
        msg = GenerateResponse(request_id=self.item.request_id, token_ids=new, text=text, offset=offset)
        if final:
            self.finished = True
            msg.finish_reason = delta.finish_reason
            msg.timings.CopyFrom(self.timings(now))
        return msg

    def timings(self, now: float) -> Timings:
        n = len(self.output)
        first, last = self.first_token_at, self.last_token_at
        ms = lambda a, b: (b - a) * 1000 if a is not None and b is not None else 0.0  # noqa: E731
        return Timings(queue_ms=ms(self.arrival, self.assigned_at), ttft_ms=ms(self.arrival, first),
                       tpot_ms=ms(first, last) / (n - 1) if n > 1 else 0.0,
                       total_ms=ms(self.arrival, last or now),
                       prompt_tokens=len(self.item.prompt_token_ids), output_tokens=n)


class RequestTable:
    """All requests this scheduler relays, by id."""

    def __init__(self) -> None:
        self.by_id: dict[str, Tracked] = {}
        self.counts = {"completed": 0, "rejected": 0, "cancelled": 0, "failed": 0}

    def add(self, item: WorkItem, tokenizer) -> Tracked:
        tracked = Tracked(item=item, arrival=time.monotonic(), tokenizer=tokenizer)
        self.by_id[item.request_id] = tracked
        return tracked

    def get(self, request_id: str) -> Tracked | None:
        return self.by_id.get(request_id)

    def end(self, request_id: str, outcome: str, failure: Failure | None = None) -> Tracked | None:
        """Forget a request; with a failure, its client stream ends with that status."""
        tracked = self.by_id.pop(request_id, None)
        if tracked is None:
            return None
        self.counts[outcome] += 1
        if failure is not None:
            tracked.stream.put_nowait(failure)
        return tracked

    def on_worker(self, worker_id: str) -> list[Tracked]:
        return [t for t in self.by_id.values() if t.worker_id == worker_id and not t.finished]
