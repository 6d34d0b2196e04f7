"""The asyncio client."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from dynabatch.client import tracing
from dynabatch.client.errors import from_rpc_error
from dynabatch.client.many import ManyCall
from dynabatch.client.request import GenerateResult, build_request
from dynabatch.client.resume import StreamState, call_metadata
from dynabatch.v1 import scheduler_pb2 as pb
from dynabatch.v1 import scheduler_pb2_grpc


class AsyncDynabatchClient:
    """Talks to a dynabatch scheduler. Use as `async with AsyncDynabatchClient(target) as c:`.

    `timeout` (seconds) is the default deadline of every call; a per-call `timeout=` overrides it.
    `credentials` (see dynabatch.client.tls_credentials) switch to TLS, `token` adds a bearer
    token. A stream that breaks with UNAVAILABLE is resumed where it stopped, up to
    `resume_retries` consecutive attempts (0: never). Leaving a `stream()` loop early cancels the
    request on the server. With OpenTelemetry installed, each stream is a CLIENT span (in
    `tracer_provider`, default the global one) whose context the scheduler continues.
    """

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 metadata: tuple[tuple[str, str], ...] = (), options: list | None = None,
                 resume_retries: int = 10, tracer_provider=None) -> None:
        opts = options or []
        self.channel = (grpc.aio.secure_channel(target, credentials, options=opts) if credentials
                        else grpc.aio.insecure_channel(target, options=opts))
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.timeout, self.metadata = timeout, call_metadata(metadata, token)
        self.resume_retries = resume_retries
        self.tracer = tracing.tracer(tracer_provider)

    async def __aenter__(self) -> AsyncDynabatchClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def stream(self, prompt: str | None = None, *, timeout: float | None = None,
                     **fields) -> AsyncIterator[pb.GenerateResponse]:
        """Yield each token delta as it arrives; raises a DynabatchError subclass on failure."""
        state = StreamState(build_request(prompt, **fields), timeout or self.timeout,
                            self.resume_retries)
        async for msg in self.follow(state):
            yield msg

    async def follow(self, state: StreamState) -> AsyncIterator[pb.GenerateResponse]:
        """A request's stream from where `state` stands (a Generate, or a Resume)."""
        call_trace, metadata = tracing.start(self.tracer, state.request, self.metadata)
        call, finished = None, False
        try:
            while not finished:
                call = state.next_call(self.stub, metadata)
                try:
                    async for msg in call:
                        state.seen(msg)
                        call_trace.message(msg)
                        finished = bool(msg.finish_reason)
                        yield msg
                    finished = True
                except grpc.aio.AioRpcError as e:
                    delay = state.retry_delay(e)
                    if delay is None:
                        finished = True
                        call_trace.error(e.code().name, e.details() or "")
                        raise from_rpc_error(e, state.request.request_id) from None
                    await asyncio.sleep(delay)
        finally:
            if not finished and call is not None:
                call.cancel()
            if not finished:
                call_trace.error("CANCELLED", "the caller stopped reading")
            call_trace.end()

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **fields) -> GenerateResult:
        """The whole generation at once."""
        result = GenerateResult()
        async for msg in self.stream(prompt, timeout=timeout, **fields):
            result.add(msg)
        return result

    def many(self, *, timeout: float | None = None) -> ManyCall:
        """One GenerateMany call for many requests (`async with client.many() as many:` then
        `many.stream(...)` / `many.generate(...)` per request, as on the client): for high
        submission rates. `timeout` bounds the whole call."""
        return ManyCall(self, timeout or self.timeout)

    async def cancel(self, request_id: str) -> bool:
        """Cancel a request by id; False if it was unknown or already finished."""
        try:
            resp = await self.stub.Cancel(pb.CancelRequest(request_id=request_id),
                                          timeout=self.timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, request_id) from None
        return resp.cancelled

    async def stats(self) -> pb.GetStatsResponse:
        try:
            return await self.stub.GetStats(pb.GetStatsRequest(), timeout=self.timeout,
                                            metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
