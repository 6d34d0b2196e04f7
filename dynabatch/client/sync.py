"""The blocking client."""
from __future__ import annotations

from collections.abc import Iterator

import grpc

from dynabatch.client.errors import from_rpc_error
from dynabatch.client.request import GenerateResult, build_request
from dynabatch.v1 import scheduler_pb2 as pb
from dynabatch.v1 import scheduler_pb2_grpc


class DynabatchClient:
    """Blocking twin of AsyncDynabatchClient (same arguments, same errors)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 metadata: tuple[tuple[str, str], ...] = (), options: list | None = None) -> None:
        opts = options or []
        self.channel = (grpc.secure_channel(target, credentials, options=opts) if credentials
                        else grpc.insecure_channel(target, options=opts))
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.timeout, self.metadata = timeout, metadata

    def __enter__(self) -> DynabatchClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def stream(self, prompt: str | None = None, *, timeout: float | None = None,
               **fields) -> Iterator[pb.GenerateResponse]:
        """Yield each token delta as it arrives; closing the iterator early cancels the request."""
        request = build_request(prompt, **fields)
        call = self.stub.Generate(request, timeout=timeout or self.timeout, metadata=self.metadata)
        finished = False
        try:
            for msg in call:
                if msg.finish_reason:
                    finished = True
                yield msg
        except grpc.RpcError as e:
            finished = True
            raise from_rpc_error(e, request.request_id) from None
        finally:
            if not finished:
                call.cancel()

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
