"""The dynabatch client SDK: needs only grpcio, protobuf and the generated code (no torch, no Redis).

    from dynabatch.client import DynabatchClient
    with DynabatchClient("127.0.0.1:50051") as c:
        print(c.generate("Hello", max_tokens=16).text)
"""
from dynabatch.client.aio import AsyncDynabatchClient
from dynabatch.client.errors import (Cancelled, DeadlineExceeded, DynabatchError, Internal,
                                     InvalidArgument, NotFound, ResourceExhausted, Unauthenticated,
                                     Unavailable)
from dynabatch.client.request import GenerateResult, build_request
from dynabatch.client.resume import tls_credentials
from dynabatch.client.sync import DynabatchClient

__all__ = ["AsyncDynabatchClient", "DynabatchClient", "GenerateResult", "build_request",
           "tls_credentials",
           "DynabatchError", "InvalidArgument", "ResourceExhausted", "DeadlineExceeded",
           "Unavailable", "Cancelled", "NotFound", "Unauthenticated", "Internal"]
