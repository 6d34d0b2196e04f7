"""Transport security and authentication of the scheduler's gRPC API (both optional).

- TLS: server certificate + key; mTLS: also a client CA, and clients must present a certificate
  it signed.
- Bearer token: every call needs metadata `authorization: Bearer <token>`, else UNAUTHENTICATED.
  Health checks stay open (probes carry no credentials). The token is compared in constant time
  and never logged.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

OPEN_METHODS = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    client_ca: str | None = None      # set: mutual TLS


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    ca = Path(tls.client_ca).read_bytes() if tls.client_ca else None
    return grpc.ssl_server_credentials([(Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""
    why = "missing or wrong bearer token (metadata authorization: Bearer <token>)"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        yield  # pragma: no cover  (makes this an async generator)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(got, str) and hmac.compare_digest(got.encode(), self._expected):
            return handler
        return _deny(handler)
