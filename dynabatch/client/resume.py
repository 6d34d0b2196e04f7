"""Riding through a broken stream: what both clients do when a stream fails with UNAVAILABLE.

The request keeps its id (the SDK assigns one when the caller did not), so after a scheduler
restart or a network break the client calls Resume(id, offset = tokens received) and the stream
continues without a gap or a duplicate. If the scheduler does not know the id and nothing was
received yet, the request never got in: it is sent again. Bounded: `retries` consecutive failed
attempts with exponential backoff, never past the call's deadline.
"""
from __future__ import annotations

import time
from pathlib import Path

import grpc

from dynabatch.v1 import scheduler_pb2 as pb

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 1.0


class StreamState:
    def __init__(self, request: pb.GenerateRequest, timeout: float | None, retries: int) -> None:
        self.request, self.retries = request, retries
        self.deadline = time.monotonic() + timeout if timeout else None
        self.received = 0           # tokens the caller has got
        self.failures = 0           # consecutive failed attempts
        self.resuming = False       # next_call makes a Resume (else a Generate)

    @classmethod
    def broken(cls, request: pb.GenerateRequest, timeout: float | None, retries: int,
               received: int) -> StreamState:
        """A stream that already broke once with UNAVAILABLE after `received` tokens: the next
        call is a Resume (or, if the request never got in, Generate again)."""
        state = cls(request, timeout, retries)
        state.received, state.resuming, state.failures = received, True, 1
        return state

    def seen(self, msg: pb.GenerateResponse) -> None:
        self.received = msg.offset + len(msg.token_ids)
        self.failures = 0

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.001, self.deadline - time.monotonic())

    def retry_delay(self, err: grpc.RpcError) -> float | None:
        """Seconds to wait before the next attempt, or None: give up and raise `err`."""
        code = err.code()
        lost_before_admission = (code == grpc.StatusCode.NOT_FOUND and self.resuming
                                 and self.received == 0)
        if code != grpc.StatusCode.UNAVAILABLE and not lost_before_admission or _ended(err):
            return None
        if self.failures >= self.retries:
            return None
        self.failures += 1
        delay = 0.0 if lost_before_admission else min(BACKOFF_MAX_S,
                                                      BACKOFF_FIRST_S * 2 ** (self.failures - 1))
        self.resuming = not lost_before_admission
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        return delay

    def next_call(self, stub, metadata):
        """The call to make now: Generate (first, or again) or Resume."""
        if not self.resuming:
            return stub.Generate(self.request, timeout=self.remaining(), metadata=metadata)
        return stub.Resume(pb.ResumeRequest(request_id=self.request.request_id, offset=self.received,
                                            skip_text=self.request.skip_text),
                           timeout=self.remaining(), metadata=metadata)


def _ended(err: grpc.RpcError) -> bool:
    """The server says the request itself is over (not merely this stream)."""
    try:
        return any(k == "x-request-ended" for k, _ in err.trailing_metadata() or ())
    except Exception:
        return False


def tls_credentials(ca_cert: str | bytes | None = None, client_cert: str | bytes | None = None,
                    client_key: str | bytes | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM paths or bytes (ca: None = the system roots; client cert
    and key: mutual TLS)."""
    def pem(v):
        return v if v is None or isinstance(v, bytes) else Path(v).read_bytes()
    return grpc.ssl_channel_credentials(pem(ca_cert), pem(client_key), pem(client_cert))


def call_metadata(metadata: tuple[tuple[str, str], ...], token: str | None) -> tuple:
    return metadata + ((("authorization", f"Bearer {token}"),) if token else ())
