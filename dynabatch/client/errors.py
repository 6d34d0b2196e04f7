"""Typed exceptions, one per gRPC status code the scheduler returns."""
from __future__ import annotations

import grpc


class DynabatchError(Exception):
    """A failed call: `code` is the gRPC status code, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.request_id = code, details, request_id


class InvalidArgument(DynabatchError):
    """A field of the request is wrong; the message names it."""


class ResourceExhausted(DynabatchError):
    """Not admitted (queue full or deadline unmeetable); retry after `retry_after_s`."""

    def __init__(self, code, details, request_id: str = "", retry_after_s: float = 0.0) -> None:
        super().__init__(code, details, request_id)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(DynabatchError):
    """The call's deadline or the request's queue TTL passed."""


class Unavailable(DynabatchError):
    """The scheduler (or every worker) could not be reached."""


class Cancelled(DynabatchError):
    """The request was cancelled."""


class NotFound(DynabatchError):
    """No such request."""


class Unauthenticated(DynabatchError):
    """Missing or wrong credentials."""


class Internal(DynabatchError):
    """The server failed the request."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INTERNAL: Internal,
}


def from_rpc_error(err: grpc.RpcError, request_id: str = "") -> DynabatchError:
    """Map a grpc error (sync or aio) to its typed exception."""
    return error_for(err.code(), err.details() or "", request_id, _retry_after(err))


def error_for(code: grpc.StatusCode, details: str, request_id: str = "",
              retry_after_s: float = 0.0) -> DynabatchError:
    """The typed exception of a status code (from an RPC, or a GenerateMany RequestError)."""
    cls = _BY_CODE.get(code, DynabatchError)
    if cls is ResourceExhausted:
        return ResourceExhausted(code, details, request_id, retry_after_s)
    return cls(code, details, request_id)


CODES = {c.value[0]: c for c in grpc.StatusCode}     # a status code by its number


def _retry_after(err: grpc.RpcError) -> float:
    try:
        meta = err.trailing_metadata() or ()
    except Exception:   # aio errors carry metadata objects; sync ones tuples
        return 0.0
    for key, value in meta:
        if key == "retry-after-ms":
            return int(value) / 1000
    return 0.0
