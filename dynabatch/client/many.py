"""GenerateMany from the client: many requests over one gRPC call.

    async with client.many() as many:
        result = await many.generate(prompt_token_ids=[1, 2, 3], max_tokens=16)

Requests started in one turn of the event loop (or while the previous message is on its way)
go out in one message, and the server answers in the same way: for a client that submits
thousands of requests a second, gRPC's cost per request nearly vanishes. Each request behaves
as on `AsyncDynabatchClient.stream`: the same deltas and the same typed errors; leaving its loop
early cancels it; a stream that breaks with UNAVAILABLE (the call broke, or the scheduler is
draining) is resumed through the Resume RPC from the tokens received. Without per-request
client spans: the call carries the client's metadata once.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from dynabatch.client.errors import CODES, DeadlineExceeded, Unavailable, error_for, from_rpc_error
from dynabatch.client.request import GenerateResult, build_request
from dynabatch.client.resume import StreamState
from dynabatch.v1 import scheduler_pb2 as pb

if TYPE_CHECKING:
    from dynabatch.client.aio import AsyncDynabatchClient

_TIMEOUT = object()     # a request's own deadline passed
_OPEN = object()        # the call has not ended


class _Inbox:
    """What arrived for one request: its deltas, then an error or the call's end."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: deque = deque()
        self.waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self):
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.items.popleft()


class ManyCall:
    """One GenerateMany call (made by `AsyncDynabatchClient.many()`)."""

    def __init__(self, client: AsyncDynabatchClient, timeout: float | None) -> None:
        self.client, self.timeout = client, timeout
        self._inboxes: dict[str, _Inbox] = {}
        self._requests: list[pb.GenerateRequest] = []    # to send
        self._cancels: list[str] = []
        self._kick_future: asyncio.Future | None = None
        self._closing = False
        self._end: object = _OPEN      # then None (ended OK) or the AioRpcError that ended it
        self._call = self._sender = self._receiver = None

    async def __aenter__(self) -> ManyCall:
        self._call = self.client.stub.GenerateMany(timeout=self.timeout,
                                                   metadata=self.client.metadata)
        self._sender = asyncio.ensure_future(self._send())
        self._receiver = asyncio.ensure_future(self._receive())
        return self

    async def __aexit__(self, typ, exc, tb) -> None:
        """No new requests; waits for those on the call to end (an exception cancels them)."""
        self._closing = True
        self._kick()
        if typ is not None:
            self._call.cancel()
        await asyncio.gather(self._sender, self._receiver, return_exceptions=True)

    async def stream(self, prompt: str | None = None, *, timeout: float | None = None,
                     **fields) -> AsyncIterator[pb.GenerateResponse]:
        """Yield each token delta of one request as it arrives (as the client's stream())."""
        request = build_request(prompt, **fields)
        rid = request.request_id
        if self._call is None or self._closing or self._end is not _OPEN:
            raise RuntimeError("this GenerateMany call is not open (use `async with client.many()`)")
        if rid in self._inboxes:
            raise ValueError(f"request_id {rid!r} is already on this call")
        inbox = self._inboxes[rid] = _Inbox()
        self._requests.append(request)
        self._kick()
        timer = (asyncio.get_running_loop().call_later(timeout, inbox.put, _TIMEOUT)
                 if timeout else None)
        received, over = 0, False
        try:
            while True:
                item = await inbox.get()
                if isinstance(item, pb.GenerateResponse):
                    received, over = item.offset + len(item.token_ids), bool(item.finish_reason)
                    yield item
                    if over:
                        return
                    continue
                if item is _TIMEOUT:
                    raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED,
                                           f"no end within {timeout} s", rid)
                over = True       # an error (or the call's end): nothing left to cancel here
                self._raise_unless_resumable(item, rid)
                break
        finally:
            if timer is not None:
                timer.cancel()
            del self._inboxes[rid]
            if not over and self._end is _OPEN:
                self._cancels.append(rid)
                self._kick()
        state = StreamState.broken(request, timeout or self.timeout, self.client.resume_retries,
                                   received)
        async for msg in self.client.follow(state):
            yield msg

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **fields) -> GenerateResult:
        """One request's whole generation."""
        result = GenerateResult()
        async for msg in self.stream(prompt, timeout=timeout, **fields):
            result.add(msg)
        return result

    def _raise_unless_resumable(self, item, rid: str) -> None:
        """A request's error, or the call's end (None: OK, or the AioRpcError), raised unless it
        is an UNAVAILABLE that leaves the request alive."""
        if isinstance(item, pb.RequestError):
            code = CODES.get(item.code, grpc.StatusCode.UNKNOWN)
            if code != grpc.StatusCode.UNAVAILABLE or item.ended:
                raise error_for(code, item.message, rid, item.retry_after_ms / 1000)
        elif item is None:
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, "the call ended before the request", rid)
        elif item.code() != grpc.StatusCode.UNAVAILABLE:
            raise from_rpc_error(item, rid)

    def _kick(self) -> None:
        if self._kick_future is not None and not self._kick_future.done():
            self._kick_future.set_result(None)

    async def _send(self) -> None:
        """Everything started since the last write, in one message."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._requests and not self._cancels:
                    if self._closing:
                        await self._call.done_writing()
                        return
                    self._kick_future = loop.create_future()
                    await self._kick_future
                    continue
                msg = pb.GenerateManyRequest(requests=self._requests,
                                             cancel_request_ids=self._cancels)
                self._requests, self._cancels = [], []
                await self._call.write(msg)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            return      # the call is over: the receiver tells every request

    async def _receive(self) -> None:
        end = None
        try:
            while True:
                resp = await self._call.read()
                if resp is grpc.aio.EOF:
                    break
                for msg in (*resp.responses, *resp.errors):
                    inbox = self._inboxes.get(msg.request_id)
                    if inbox is not None:
                        inbox.put(msg)
        except grpc.aio.AioRpcError as e:
            end = e
        finally:
            self._end = end
            for inbox in self._inboxes.values():
                inbox.put(end)
            self._kick()
