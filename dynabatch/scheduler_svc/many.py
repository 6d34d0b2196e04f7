"""GenerateMany: many requests over one bidirectional call.

Each request on the call runs the same admission and stream code as a Generate call
(SchedulerService._admit and _stream), against a RequestContext that stands in for its own
gRPC context: its writes go to the call's outbox, its abort becomes the request's RequestError.
One writer sends everything the outbox gathered as one message: while a write is in flight the
deltas of every request pile up behind it, so the busier the call, the more each message
carries (and the less gRPC costs per request).
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from dynabatch.scheduler_svc.handlers import Malformed
from dynabatch.scheduler_svc.requests import resolve
from dynabatch.scheduler_svc.telemetry import METHOD_MANY
from dynabatch.v1 import scheduler_pb2 as pb

log = logging.getLogger("dynabatch.scheduler")
OUTBOX_MAX = 4096       # messages waiting to be written before the requests' streams wait too


class RequestContext:
    """The part of grpc.aio.ServicerContext that admission and streaming use, for one request
    of a GenerateMany call."""

    __slots__ = ("call", "request_id", "_code", "_details", "_trailing")

    def __init__(self, call: ManyCall, request_id: str) -> None:
        self.call, self.request_id = call, request_id
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple = ()

    def invocation_metadata(self):
        return self.call.context.invocation_metadata()

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        self._code, self._details = code, details
        raise grpc.aio.AbortError()

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    async def write(self, message: pb.GenerateResponse) -> None:
        await self.call.put(message)

    def error(self) -> pb.RequestError:
        """The aborted request's error message."""
        trailing = dict(self._trailing)
        code = self._code or grpc.StatusCode.UNKNOWN
        return pb.RequestError(request_id=self.request_id, code=code.value[0],
                               message=self._details,
                               retry_after_ms=int(trailing.get("retry-after-ms", 0)),
                               # as for Generate: only UNAVAILABLE may be resumed
                               ended=(code != grpc.StatusCode.UNAVAILABLE
                                      or trailing.get("x-request-ended") == "true"))


class ManyCall:
    """One GenerateMany call: a reader that starts each request's task, and one writer."""

    def __init__(self, service, context: grpc.aio.ServicerContext) -> None:
        self.service, self.context = service, context
        self.tasks: set[asyncio.Task] = set()
        self.outbox: list = []
        self._news: asyncio.Future | None = None       # resolved when the outbox fills
        self._room: asyncio.Future | None = None       # resolved when the outbox empties

    async def run(self, requests) -> None:
        reader = asyncio.ensure_future(self._read(requests))
        reader.add_done_callback(lambda _: self._wake())
        try:
            await self._write_until_done(reader)
        finally:
            reader.cancel()
            for task in self.tasks:
                task.cancel()       # the call is over: its requests' streams cancel them
            await asyncio.gather(reader, *self.tasks, return_exceptions=True)
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()

    async def _read(self, requests) -> None:
        async for msg in requests:
            if isinstance(msg, Malformed):
                await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, msg.why)
            for request in msg.requests:
                self._start(request)
            for request_id in msg.cancel_request_ids:
                await self.service.cancel(request_id, "cancelled by client")

    def _start(self, request: pb.GenerateRequest) -> None:
        task = asyncio.ensure_future(self._one(request))
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not self.tasks:
            self._wake()

    async def _one(self, request: pb.GenerateRequest) -> None:
        """One request, as Generate runs it; how it failed, if it did, goes in the outbox."""
        ctx = RequestContext(self, request.request_id)
        try:
            if not request.request_id:
                await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "request_id: required on GenerateMany (the key of its deltas)")
            await self.service.generate(request, ctx, METHOD_MANY)
        except grpc.aio.AbortError:
            self.outbox.append(ctx.error())
            self._wake()

    async def put(self, message: pb.GenerateResponse) -> None:
        self.outbox.append(message)
        self._wake()
        if len(self.outbox) >= OUTBOX_MAX:     # the client reads slower than tokens come
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room)

    def _wake(self) -> None:
        if self._news is not None:
            resolve(self._news)

    async def _write_until_done(self, reader: asyncio.Task) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if reader.done() and reader.exception() is not None:
                return      # the call ends with the reader's error (run raises it)
            if not self.outbox:
                if reader.done() and not self.tasks:
                    return
                self._news = loop.create_future()
                await self._news
                continue
            batch, self.outbox = self.outbox, []
            if self._room is not None:
                resolve(self._room)
            out = pb.GenerateManyResponse()
            for m in batch:
                (out.errors if isinstance(m, pb.RequestError) else out.responses).append(m)
            await self.context.write(out)
