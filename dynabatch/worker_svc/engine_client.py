"""The serving process's handle on its engine process (engine_proc.py), for an asyncio loop.

Commands go out without waiting (a write buffer drained by the event loop when the socket is
full); what the engine sends is read by an event-loop reader callback into a list the worker
loop takes between its own I/O, so reading never waits for the worker loop and vice versa.
`in_thread` runs the same engine server in a thread of this process instead, over the same
socket: for the embedded stack (tests, `dynabatch up`), where a process per worker would import
torch again for each; the engine then shares this process's GIL, as it did before the split.
A dead engine process surfaces as EngineDied (with its exit status) from `take` and `wait`:
the worker then exits rather than hold requests it can no longer run (the scheduler reclaims
them once its heartbeat expires).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading

from dynabatch.v1.worker_pb2 import WorkItem
from dynabatch.worker_svc import engine_wire as wire
from dynabatch.worker_svc.engine.api import EngineStats
from dynabatch.worker_svc.engine_proc import EngineSpec, serve

log = logging.getLogger("dynabatch.worker")
_BUF = 4 << 20            # socket buffers: many steps of rows before the engine would block
CLOSE_GRACE_S = 10.0


class EngineDied(RuntimeError):
    """The engine process exited on its own (crash, poison request, OOM kill)."""

    def __init__(self, status: int | None) -> None:
        super().__init__(f"engine process exited (status {status})")
        self.status = status

    @property
    def exit_code(self) -> int:
        """What the worker exits with: the engine's own status, 128 + signal if killed."""
        if self.status is None or self.status == 0:
            return 1
        return self.status if self.status > 0 else 128 - self.status


class EngineProcess:
    def __init__(self, spec: EngineSpec, in_thread: bool = False) -> None:
        self.spec, self.in_thread = spec, in_thread
        self.proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self.stats: EngineStats | None = None      # latest figures the engine sent
        self._sock: socket.socket | None = None
        self._reader = wire.FrameReader()
        self._frames: list[bytes] = []
        self._wake: asyncio.Future | None = None
        self._out = bytearray()                    # commands not yet written
        self._eof = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Start the engine process and wait until its engine is built (model loaded)."""
        if self.proc is not None or self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (ours, theirs):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUF)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUF)
        if self.in_thread:
            self._thread = threading.Thread(target=serve, args=(self.spec, theirs), daemon=True,
                                            name="engine")
            self._thread.start()
        else:
            # From the event loop's thread: PR_SET_PDEATHSIG follows the thread that forked.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dynabatch.worker_svc.engine_proc", self.spec.to_json(),
                 str(theirs.fileno()), str(os.getpid())], pass_fds=[theirs.fileno()])
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._loop.add_reader(ours.fileno(), self._readable)
        while not self._frames:
            await self.wait(None)
            if self._eof and not self._frames:      # failed to build (its traceback: stderr)
                raise EngineDied(self._status())
        first = self._frames.pop(0)
        if first[:1] != wire.READY:
            raise RuntimeError(f"engine process sent {first[:1]!r} before READY")
        self.stats = wire.ready_stats(first)

    # -- commands -----------------------------------------------------------------------------
    def add(self, handle: int, item: WorkItem) -> None:
        self._send(wire.add(handle, item.SerializeToString()))

    def abort(self, handle: int) -> None:
        self._send(wire.abort(handle))

    def abort_all(self) -> None:
        self._send(wire.abort_all())

    def set_step_prefill_tokens(self, n: int) -> None:
        self._send(wire.budget(n))

    def _send(self, data: bytes) -> None:
        if self._out:                  # keep the order: behind what is already waiting
            self._out += data
            return
        try:
            n = self._sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:                # the engine is gone: take() reports it
            return
        if n < len(data):
            self._out += data[n:]
            self._loop.add_writer(self._sock.fileno(), self._writable)

    def _writable(self) -> None:
        try:
            n = self._sock.send(self._out)
        except BlockingIOError:
            return
        except OSError:
            n = len(self._out)
        del self._out[:n]
        if not self._out:
            self._loop.remove_writer(self._sock.fileno())

    # -- events -------------------------------------------------------------------------------
    def _readable(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self._eof = True
                self._loop.remove_reader(self._sock.fileno())
                break
            self._frames += self._reader.feed(data)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def take(self) -> list[bytes]:
        """The frames received so far (READY excluded); EngineDied once the engine is gone and
        everything it sent has been taken."""
        frames, self._frames = self._frames, []
        if not frames and self._eof:
            raise EngineDied(self._status())
        rows = sum(f[:1] == wire.OUTPUTS for f in frames)
        if rows:
            self._send(wire.credit(rows))       # the engine may run that much further ahead
        return frames

    async def wait(self, other: asyncio.Future | None, timeout: float | None = None) -> None:
        """Until the engine sent something (or died), `other` is done, or the timeout."""
        if not (self._frames or self._eof):
            self._wake = self._loop.create_future()
            waits = {self._wake} if other is None else {self._wake, other}
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            self._wake = None
        if self._eof and not self._frames and self.proc and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):    # reap it: its status
                await asyncio.to_thread(self.proc.wait, 5)

    def _status(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    async def close(self) -> None:
        """End the engine process: end of file on its socket, then SIGKILL after a grace."""
        if self.proc is None and self._thread is None:
            return
        if self._sock is not None:
            if not self._eof:
                self._loop.remove_reader(self._sock.fileno())
            if self._out:
                self._loop.remove_writer(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, CLOSE_GRACE_S)
            return
        try:
            await asyncio.to_thread(self.proc.wait, CLOSE_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("engine process did not exit; killing it")
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
