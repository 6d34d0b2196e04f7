"""Registering the Scheduler service so that no request bytes can make it fail with INTERNAL.

The generated add_SchedulerServicer_to_server deserializes with FromString: bytes that do not
decode (invalid UTF-8 in a string field, truncated varints) would end the call with INTERNAL
before the servicer runs. Here the deserializer never raises: it hands the servicer a Malformed
value (on a client stream, in place of the message), which the servicer answers with
INVALID_ARGUMENT.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import message_factory

from dynabatch.v1 import scheduler_pb2

SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"]


@dataclass(frozen=True)
class Malformed:
    """Request bytes that are not a valid message of the method's input type."""
    why: str


def _lenient(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except Exception as e:   # DecodeError, and anything else the parser may raise
            return Malformed(f"request: not a valid {cls.__name__} ({type(e).__name__}: {e})")
    return parse


def _serialize(msg) -> bytes:
    return msg.SerializeToString()


FACTORIES = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}


def add_scheduler_service(servicer, server: grpc.aio.Server) -> None:
    handlers = {}
    for method in SERVICE.methods:
        factory = FACTORIES[method.client_streaming, method.server_streaming]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=_lenient(message_factory.GetMessageClass(method.input_type)),
            response_serializer=_serialize)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    # Registered too (as the generated code does): the server then takes each call with its
    # request message already read, one gRPC operation (and event-loop wake) less per call.
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
