"""The load benchmark's C driver: nghttp2's h2load POSTs one gRPC-framed GenerateRequest over
many HTTP/2 streams, at 0.1-0.2 core instead of the Python SDK's 0.7-1. h2load counts a request
that ended with HTTP 200 as a success even when its grpc-status trailer is an error, so its
result is checked against the stack's own counters (check)."""
from __future__ import annotations

import re
import resource
import shutil
import struct
import subprocess
import tempfile

Counts = dict[str, int]
H2LOAD_MISSING = ("--driver h2load: no `h2load` on PATH; install it with "
                  "`apt-get install -y nghttp2-client` (Debian/Ubuntu) or `brew install nghttp2`")


def grpc_body(max_tokens: int) -> bytes:
    """The SDK driver's request as one gRPC message on the wire: uncompressed flag, 4-byte
    big-endian length, the serialized GenerateRequest. No request_id: the scheduler assigns one
    (each h2load stream sends the same bytes)."""
    from dynabatch.v1 import scheduler_pb2 as pb
    msg = pb.GenerateRequest(prompt_token_ids=[1, 2, 3, 4], max_tokens=max_tokens, ignore_eos=True,
                             skip_text=True).SerializeToString()
    return b"\0" + struct.pack(">I", len(msg)) + msg


def run(target: str, seconds: float, concurrency: int, max_tokens: int,
            connections: int, threads: int) -> dict:
    """Run h2load for `seconds`: `connections` HTTP/2 connections, `concurrency` streams in all."""
    exe = shutil.which("h2load")
    if exe is None:
        raise SystemExit(H2LOAD_MISSING)
    streams = -(-concurrency // connections)
    with tempfile.NamedTemporaryFile(suffix=".grpc") as body:
        body.write(grpc_body(max_tokens))
        body.flush()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(
            [exe, "-D", f"{round(seconds * 1000)}ms", "-c", str(connections), "-m", str(streams),
             "-t", str(min(threads, connections)), "-d", body.name,
             "-H", "content-type: application/grpc", "-H", "te: trailers",
             f"http://{target}/dynabatch.v1.Scheduler/Generate"],
            capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out.stdout)
    rate = re.search(r"finished in [\d.]+[mu]?s, ([\d.]+) req/s", out.stdout)   # 998.79ms or 1.00s
    if out.returncode or m is None or rate is None:
        raise RuntimeError(f"h2load failed (exit {out.returncode}):\n{out.stdout}{out.stderr}")
    done, ok, failed, errored, timeout = map(int, m.groups()[2:])
    return {"h2load_done": done, "h2load_succeeded": ok, "h2load_req_per_s": float(rate[1]),
            "errors": failed + errored + timeout, "streams_per_connection": streams,
            "client_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}


def check(run: dict, server: Counts, in_flight: int) -> None:
    """h2load's successes are HTTP 200s; the stack must have completed as many (grpc-status 0),
    give or take the streams h2load dropped when time was up, and refused or failed none."""
    ok = run["h2load_succeeded"]
    bad = {k: server[k] for k in ("rejected", "failed") if server[k]}
    if run["errors"] or bad or not ok <= server["completed"] <= ok + in_flight:
        raise RuntimeError(f"h2load and the stack disagree: h2load {run}, stack {server} "
                           f"(expected completed in [{ok}, {ok + in_flight}], none rejected "
                           f"or failed)")
