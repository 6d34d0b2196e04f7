"""Decoding what comes out of the queue: protobuf only (never pickle or eval), and checked.

Anything that does not decode, or decodes into nonsense (random bytes often parse as a valid
protobuf with unknown fields), raises Garbage; the backend quarantines it and skips it, so a
stray or hostile value can never crash a worker or a scheduler.
"""
from __future__ import annotations

import json
import re
import time
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from dynabatch.v1.worker_pb2 import TokenDeltaBatch, WorkerControl, WorkerFeedback, WorkItem

M = TypeVar("M", bound=Message)
_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
QUARANTINE_KEEP = 1000          # quarantined records kept (newest first)
_RAW_KEPT = 512                 # bytes of a quarantined value kept for inspection


class Garbage(ValueError):
    """A queue value that is not a well-formed message of the expected kind."""


def _check_item(m: WorkItem) -> None:
    if not _ID.match(m.request_id):
        raise Garbage("WorkItem.request_id is not a valid id")
    if not m.model or not m.prompt_token_ids or m.max_tokens <= 0:
        raise Garbage("WorkItem lacks model, prompt or max_tokens")
    if any(t < 0 for t in m.prompt_token_ids) or len(m.resume_token_ids) > m.max_tokens:
        raise Garbage("WorkItem has negative token ids or more resume tokens than max_tokens")


def _check_batch(m: TokenDeltaBatch) -> None:
    if any(not _ID.match(d.request_id) for d in m.deltas):
        raise Garbage("TokenDelta.request_id is not a valid id")


def _check_feedback(m: WorkerFeedback) -> None:
    if not _ID.match(m.worker_id) or not m.model:
        raise Garbage("WorkerFeedback lacks a valid worker_id or model")


def _check_control(m: WorkerControl) -> None:
    if any(not _ID.match(r) for r in m.cancel_request_ids):
        raise Garbage("WorkerControl names an invalid request id")


_CHECKS = {WorkItem: _check_item, TokenDeltaBatch: _check_batch, WorkerFeedback: _check_feedback,
           WorkerControl: _check_control}


def decode(cls: type[M], raw: object) -> M:
    """Parse and sanity-check one queue value; raises Garbage."""
    if not isinstance(raw, (bytes, bytearray)):
        raise Garbage(f"expected {cls.__name__} bytes, got {type(raw).__name__}")
    try:
        msg = cls.FromString(bytes(raw))
    except (DecodeError, ValueError, RuntimeError) as e:
        raise Garbage(f"not a {cls.__name__}: {e}") from None
    _CHECKS[cls](msg)
    return msg


def quarantine_record(kind: str, key: str, raw: object, why: str) -> bytes:
    """The JSON kept in the quarantine list for one bad value (a prefix of it, hex-encoded)."""
    data = raw if isinstance(raw, (bytes, bytearray)) else repr(raw).encode()
    return json.dumps({"kind": kind, "key": key, "why": why, "unix_s": time.time(),
                       "bytes": len(data), "raw_hex": bytes(data[:_RAW_KEPT]).hex()}).encode()
