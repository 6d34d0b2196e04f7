"""The byte format between the worker's serving process and its engine process.

Why a format of our own: the engine process exists so that the serving side's Python (queue I/O,
protobuf deltas) never holds the GIL the engine's Python needs between GPU launches. What crosses
per step must then cost the engine almost nothing to write: a step's outputs are a few flat int32
arrays (request handle, offset, token count, tokens) and a finish code per row, not objects, and
never pickle. Requests go the other way as WorkItem protobuf bytes (data read from Redis is only
ever decoded as protobuf).

Frames: a 4-byte little-endian length, then the payload; the payload's first byte is its type.
  parent -> engine  ADD (handle, WorkItem bytes), ABORT (handle), ABORT_ALL, CREDIT (n OUTPUTS
                    frames taken in: the engine runs at most MAX_AHEAD frames ahead), BUDGET
                    (prefill tokens per step, from the scheduler's WorkerControl)
  engine -> parent  READY (stats), OUTPUTS (rows; step timing when a step ran, and how long the
                    engine waited for credits before it and how long it spent between it and
                    the step before when back to back; stats when due),
                    ADD_ERROR (handle, message)
Handles are the parent's int32 ids for one attempt at a request: a stale row (an attempt the
parent already dropped) can never be mistaken for a newer attempt with the same request id.
"""
from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

from dynabatch.worker_svc.engine.api import EngineStats, TokenOutput

ADD, ABORT, ABORT_ALL, CREDIT, BUDGET = b"A", b"X", b"Z", b"C", b"B"
READY, OUTPUTS, ADD_ERROR = b"R", b"O", b"E"

# Frames of rows the engine may have sent that the serving side has not taken in yet. Beyond
# that the engine waits instead of queueing without bound: tokens never pile up more than a few
# steps behind, and a model-free engine (no step time) runs at the pace its outputs are served.
# With steps slower than the serving side's work per step it never waits.
MAX_AHEAD = 8

STEP_KINDS = ("", "prefill", "decode", "step")       # OUTPUTS.kind: "" = no step ran
FINISH_CODES = {None: 0, "stop": 1, "length": 2, "abort": 3}
FINISH_NAMES = (None, "stop", "length", "abort")

_LEN = struct.Struct("<I")
_HANDLE = struct.Struct("<i")
# kind, rows, tokens, has_stats, step start (unix ns), step seconds, credit wait before it (s),
# time since the previous step's end if back to back (s)
_OUT_HEAD = struct.Struct("<BIIBqddd")
_STATS = struct.Struct("<10q3d")
_INT_ROWS = array("i").itemsize
assert _INT_ROWS == 4


def frame(payload: bytes) -> bytes:
    return _LEN.pack(len(payload)) + payload


class FrameReader:
    """Splits a byte stream into frames (payloads), however the reads cut it."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames, pos, buf = [], 0, self._buf
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            frames.append(bytes(buf[pos + 4:pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        return frames


# -- parent -> engine --------------------------------------------------------------------------
def add(handle: int, item_bytes: bytes) -> bytes:
    return frame(ADD + _HANDLE.pack(handle) + item_bytes)


def abort(handle: int) -> bytes:
    return frame(ABORT + _HANDLE.pack(handle))


def abort_all() -> bytes:
    return frame(ABORT_ALL)


def credit(n: int) -> bytes:
    return frame(CREDIT + _HANDLE.pack(n))


def budget(tokens: int) -> bytes:
    return frame(BUDGET + _HANDLE.pack(tokens))


def handle_of(payload: bytes) -> int:
    return _HANDLE.unpack_from(payload, 1)[0]


# -- engine -> parent --------------------------------------------------------------------------
def _stats_bytes(s: EngineStats) -> bytes:
    return _STATS.pack(s.running, s.waiting, s.kv_blocks_total, s.kv_blocks_used, s.kv_block_size,
                       s.max_model_len, s.max_running, s.steps, s.preemptions,
                       s.step_prefill_tokens, s.decode_step_ms,
                       s.decode_batch_size, s.prefill_tokens_per_s)


def _stats_from(payload: bytes, pos: int) -> EngineStats:
    (running, waiting, total, used, block, max_len, max_running, steps, preemptions, budget,
     step_ms, batch, prefill) = _STATS.unpack_from(payload, pos)
    return EngineStats(running=running, waiting=waiting, kv_blocks_total=total,
                       kv_blocks_used=used, kv_block_size=block, decode_step_ms=step_ms,
                       decode_batch_size=batch, prefill_tokens_per_s=prefill,
                       max_model_len=max_len, max_running=max_running, steps=steps,
                       preemptions=preemptions, step_prefill_tokens=budget)


def ready(stats: EngineStats) -> bytes:
    return frame(READY + _stats_bytes(stats))


def ready_stats(payload: bytes) -> EngineStats:
    return _stats_from(payload, 1)


def add_error(handle: int, message: str) -> bytes:
    return frame(ADD_ERROR + _HANDLE.pack(handle) + message.encode("utf-8", "replace"))


def add_error_message(payload: bytes) -> str:
    return payload[5:].decode("utf-8", "replace")


def outputs(handles: list[int], outs: list[TokenOutput], kind: str = "", start_ns: int = 0,
            seconds: float = 0.0, stats: EngineStats | None = None,
            stalled_s: float = 0.0, gap_s: float = 0.0) -> bytes:
    """Rows for `outs` (handles[i] is outs[i]'s handle, -1 if unknown); kind "" = no step ran.
    `stalled_s`: how long the engine, with work to do, waited for credits since its last frame;
    `gap_s`: the time from the previous step's end to this step's start when the engine had
    work all along (its loop's own time between steps, plus any stall)."""
    tokens = array("i", [t for o in outs for t in o.token_ids])
    head = _OUT_HEAD.pack(STEP_KINDS.index(kind), len(outs), len(tokens), stats is not None,
                          start_ns, seconds, stalled_s, gap_s)
    return frame(b"".join((
        OUTPUTS, head, array("i", handles).tobytes(),
        array("i", [o.offset for o in outs]).tobytes(),
        array("i", [len(o.token_ids) for o in outs]).tobytes(),
        bytes([FINISH_CODES[o.finish_reason] for o in outs]), tokens.tobytes(),
        _stats_bytes(stats) if stats is not None else b"")))


@dataclass
class Rows:
    """One OUTPUTS frame, decoded: row i is handles[i], tokens[starts[i]:starts[i] + counts[i]]."""
    kind: str
    start_ns: int
    seconds: float
    handles: array
    offsets: array
    counts: array
    finish: bytes
    tokens: array
    stats: EngineStats | None
    stalled_s: float = 0.0
    gap_s: float = 0.0

    def __len__(self) -> int:
        return len(self.handles)


def rows(payload: bytes) -> Rows:
    kind, n, ntok, has_stats, start_ns, seconds, stalled_s, gap_s = _OUT_HEAD.unpack_from(payload,
                                                                                          1)
    pos = 1 + _OUT_HEAD.size

    def ints(count: int) -> array:
        nonlocal pos
        a = array("i")
        a.frombytes(payload[pos:pos + 4 * count])
        pos += 4 * count
        return a
    handles, offsets, counts = ints(n), ints(n), ints(n)
    finish = payload[pos:pos + n]
    pos += n
    tokens = ints(ntok)
    stats = _stats_from(payload, pos) if has_stats else None
    return Rows(STEP_KINDS[kind], start_ns, seconds, handles, offsets, counts, finish, tokens, stats,
                stalled_s, gap_s)
