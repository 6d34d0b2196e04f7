"""The engine process: builds the engine and steps it back to back, in a process of its own.

Why a process: between GPU launches the engine runs Python (input staging, sampling
bookkeeping) that is on the GPU's critical path. In one process with the queue I/O (Redis,
protobuf deltas for 256 requests a step) both need the GIL, and every millisecond the I/O holds
it stalls the GPU. Here the only serving work per step is writing the step's rows to a socket
(engine_wire.outputs, tens of microseconds); the serving process (loop.py) does the rest.

It never waits for the serving process: it applies whatever commands have arrived between steps
and blocks only when it has no work. It is tied to its parent: it dies with it (Linux
PR_SET_PDEATHSIG, and end-of-file on the socket), and ignores SIGINT/SIGTERM, which are the
parent's to act on (drain first, then close the socket).

    python -m dynabatch.worker_svc.engine_proc SPEC_JSON SOCKET_FD PARENT_PID
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field

from dynabatch.v1.worker_pb2 import WorkItem
from dynabatch.wire.heap import freeze_startup_heap
from dynabatch.worker_svc import engine_wire as wire
from dynabatch.worker_svc.engine.api import (Engine, EngineStats, Sampling, SequenceRequest,
                                             TokenOutput)

STATS_EVERY_S = 0.02    # stats ride along with a step's rows at most this often (and when idle)
_PR_SET_PDEATHSIG = 1


@dataclass
class EngineSpec:
    """What to build in the engine process (JSON: it crosses a process boundary)."""
    kind: str          # "fake" or "torch"
    model: str
    options: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def build(engine_kind: str, model: str, **engine_options) -> Engine:
    """`fake`: the model-free engine (tests, load benchmarks); otherwise the real engine."""
    if engine_kind == "fake":
        from dynabatch.worker_svc.fake_engine import FakeEngine
        return FakeEngine(**engine_options)
    from dynabatch.worker_svc.engine import build_engine
    return build_engine(model, **engine_options)


def to_sequence(item: WorkItem) -> SequenceRequest:
    s = item.sampling
    return SequenceRequest(
        request_id=item.request_id, prompt_token_ids=list(item.prompt_token_ids),
        max_tokens=item.max_tokens,
        sampling=Sampling(temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k,
                          seed=s.seed if s.HasField("seed") else None),
        stop_token_ids=tuple(item.stop_token_ids), ignore_eos=item.ignore_eos,
        priority=item.priority or 2, resume_token_ids=list(item.resume_token_ids))


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:      # the parent died before prctl took effect
        os._exit(1)


class EngineServer:
    """The engine process's loop: commands in, one OUTPUTS frame per step out."""

    def __init__(self, engine: Engine, sock: socket.socket) -> None:
        self.engine, self.sock = engine, sock
        self.reader = wire.FrameReader()
        self.handle: dict[str, int] = {}       # request id -> handle of its live attempt
        self.rid: dict[int, str] = {}          # handle -> request id
        self._stats_at = 0.0
        self._last_end: float | None = None    # end of the previous step, if back to back
        self._period_ms = 0.0
        self._ahead = 0                         # OUTPUTS frames sent, not yet credited
        self._stalled = 0.0     # seconds waited for credits with work to do, not yet reported

    def serve(self) -> None:
        self.sock.sendall(wire.ready(self.engine.stats()))
        while True:
            has_work = self.engine.has_work()
            can_step = has_work and self._ahead < wire.MAX_AHEAD
            t0 = time.perf_counter()
            commands = self._commands(block=not can_step)
            if has_work and not can_step:     # the serving side is behind: say for how long
                self._stalled += time.perf_counter() - t0
            if commands is None:              # the parent closed the socket: done
                return
            self._apply(commands)
            if self._ahead >= wire.MAX_AHEAD:
                continue
            if self.engine.has_work():
                self._step()
            elif commands:
                self._send([], [], stats=True)      # figures changed without a step

    def _commands(self, block: bool) -> list[bytes] | None:
        """The commands that arrived (waiting for one when `block`); None at end of file."""
        frames: list[bytes] = []
        while select.select([self.sock], [], [], None if block else 0.0)[0]:
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            frames += self.reader.feed(data)
            if frames:
                break
        return frames

    def _apply(self, commands: list[bytes]) -> None:
        aborted: list[TokenOutput] = []
        handles: list[int] = []
        for c in commands:
            kind = c[:1]
            if kind == wire.ADD:
                self._add(wire.handle_of(c), c[5:])
            elif kind == wire.ABORT:
                rid = self.rid.get(wire.handle_of(c))
                if rid is not None and self.engine.abort(rid):
                    handles.append(self._forget(rid))
                    aborted.append(TokenOutput(rid, [], 0, "abort"))
            elif kind == wire.CREDIT:
                self._ahead -= wire.handle_of(c)
            elif kind == wire.BUDGET:
                self.engine.set_step_prefill_tokens(wire.handle_of(c))
            elif kind == wire.ABORT_ALL:
                for rid in list(self.handle):
                    self.engine.abort(rid)
                self.handle.clear()
                self.rid.clear()
        if aborted:
            self._send(handles, aborted)

    def _add(self, handle: int, item_bytes: bytes) -> None:
        try:
            item = WorkItem.FromString(item_bytes)
            self.engine.add(to_sequence(item))
        except Exception as e:     # a bad request fails alone, never the engine
            self.sock.sendall(wire.add_error(handle, str(e)))
            return
        self.handle[item.request_id] = handle
        self.rid[handle] = item.request_id

    def _forget(self, rid: str) -> int:
        handle = self.handle.pop(rid)
        del self.rid[handle]
        return handle

    def _step(self) -> None:
        start_ns, t0 = time.time_ns(), time.perf_counter()
        outs = self.engine.step()
        end = time.perf_counter()
        get = self.handle.get
        handles = [get(o.request_id, -1) for o in outs]
        for o in outs:
            if o.finish_reason and o.request_id in self.handle:
                self._forget(o.request_id)
        gap = 0.0 if self._last_end is None else t0 - self._last_end
        if self._last_end is not None:
            ms = (end - self._last_end) * 1000
            self._period_ms = ms if not self._period_ms else 0.9 * self._period_ms + 0.1 * ms
        idle = not self.engine.has_work()
        self._last_end = None if idle else end
        record = getattr(self.engine, "last_step", None)
        self._send(handles, outs, record.kind if record else "step", start_ns, end - t0,
                   stats=idle or end - self._stats_at >= STATS_EVERY_S, gap_s=gap)

    def _send(self, handles: list[int], outs: list[TokenOutput], kind: str = "",
              start_ns: int = 0, seconds: float = 0.0, stats: bool = False,
              gap_s: float = 0.0) -> None:
        snapshot = None
        if stats:
            self._stats_at = time.perf_counter()
            snapshot = self._stats()
        self.sock.sendall(wire.outputs(handles, outs, kind, start_ns, seconds, snapshot,
                                       self._stalled, gap_s))
        self._stalled = 0.0
        self._ahead += 1

    def _stats(self) -> EngineStats:
        """The engine's figures; its step time is the step period back to back when the loop
        around the step adds to it (the admission and SLA estimates rest on it)."""
        s = self.engine.stats()
        s.decode_step_ms = max(s.decode_step_ms, self._period_ms)
        return s


def serve(spec: EngineSpec, sock: socket.socket) -> None:
    """Build the engine and serve it on `sock` until the other end closes it."""
    try:
        engine = build(spec.kind, spec.model, **spec.options)
        freeze_startup_heap()        # after the model and its graphs: no GC pause between steps
        EngineServer(engine, sock).serve()
    except (BrokenPipeError, ConnectionResetError):    # the parent went away mid-send
        pass
    finally:
        sock.close()


def main(argv: list[str]) -> int:
    spec_json, fd, parent_pid = argv
    _die_with_parent(int(parent_pid))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    serve(EngineSpec(**json.loads(spec_json)), socket.socket(fileno=int(fd)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
