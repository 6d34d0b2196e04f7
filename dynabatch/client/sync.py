"""The blocking client."""
from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from dynabatch.client import tracing
from dynabatch.client.errors import from_rpc_error
from dynabatch.client.request import GenerateResult, build_request
from dynabatch.client.resume import StreamState, call_metadata
from dynabatch.v1 import scheduler_pb2 as pb
from dynabatch.v1 import scheduler_pb2_grpc


class DynabatchClient:
    """Blocking twin of AsyncDynabatchClient (same arguments, same errors)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 metadata: tuple[tuple[str, str], ...] = (), options: list | None = None,
                 resume_retries: int = 10, tracer_provider=None) -> None:
        opts = options or []
        self.channel = (grpc.secure_channel(target, credentials, options=opts) if credentials
                        else grpc.insecure_channel(target, options=opts))
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.timeout, self.metadata = timeout, call_metadata(metadata, token)
        self.resume_retries = resume_retries
        self.tracer = tracing.tracer(tracer_provider)

    def __enter__(self) -> DynabatchClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def stream(self, prompt: str | None = None, *, timeout: float | None = None,
               **fields) -> Iterator[pb.GenerateResponse]:
        """Yield each token delta as it arrives; closing the iterator early cancels the request."""
        state = StreamState(build_request(prompt, **fields), timeout or self.timeout,
                            self.resume_retries)
        call_trace, metadata = tracing.start(self.tracer, state.request, self.metadata)
        call, finished = None, False
        try:
            while not finished:
                call = state.next_call(self.stub, metadata)
                try:
                    for msg in call:
                        state.seen(msg)
                        call_trace.message(msg)
                        finished = bool(msg.finish_reason)
                        yield msg
                    finished = True
                except grpc.RpcError as e:
                    delay = state.retry_delay(e)
                    if delay is None:
                        finished = True
                        call_trace.error(e.code().name, e.details() or "")
                        raise from_rpc_error(e, state.request.request_id) from None
                    time.sleep(delay)
        finally:
            if not finished and call is not None:
                call.cancel()
            if not finished:
                call_trace.error("CANCELLED", "the caller stopped reading")
            call_trace.end()

    def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                 **fields) -> GenerateResult:
        result = GenerateResult()
        for msg in self.stream(prompt, timeout=timeout, **fields):
            result.add(msg)
        return result

    def cancel(self, request_id: str) -> bool:
        try:
            return self.stub.Cancel(pb.CancelRequest(request_id=request_id), timeout=self.timeout,
                                    metadata=self.metadata).cancelled
        except grpc.RpcError as e:
            raise from_rpc_error(e, request_id) from None

    def stats(self) -> pb.GetStatsResponse:
        try:
            return self.stub.GetStats(pb.GetStatsRequest(), timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
