"""The load benchmark's h2load driver: its gRPC framing, and its check against the stack's own
counters (h2load counts an HTTP 200 whose grpc-status trailer is an error as a success)."""
from __future__ import annotations

import shutil
import struct

import pytest

from dynabatch.bench import h2load, load
from dynabatch.v1 import scheduler_pb2 as pb


def test_body_is_one_uncompressed_grpc_message():
    body = h2load.grpc_body(7)
    assert body[0] == 0 and struct.unpack(">I", body[1:5])[0] == len(body) - 5
    req = pb.GenerateRequest.FromString(body[5:])
    assert req.max_tokens == 7 and not req.request_id and req.skip_text and req.ignore_eos


def test_check_refuses_http_successes_the_stack_did_not_complete():
    run = {"h2load_succeeded": 100, "errors": 0}
    h2load.check(run, {"completed": 103, "rejected": 0, "failed": 0}, in_flight=8)
    for server in ({"completed": 0, "rejected": 0, "failed": 0},       # e.g. INVALID_ARGUMENT
                   {"completed": 100, "rejected": 3, "failed": 0},
                   {"completed": 100, "rejected": 0, "failed": 1},
                   {"completed": 120, "rejected": 0, "failed": 0}):
        with pytest.raises(RuntimeError, match="disagree"):
            h2load.check(run, server, in_flight=8)


@pytest.mark.skipif(shutil.which("h2load") is None,
                    reason="no h2load (apt-get install -y nghttp2-client)")
def test_h2load_against_the_local_stack():
    procs, target = load._in_process(workers=1, max_running=64, floor=False, processes=1, cpus=None)
    try:
        counters, pids = load._pipe_counts(procs), [p.pid for p in procs]
        ok = load.phase(target, pids, "admissions", 1.0, 1, 16, 1, 2, "h2load", counters)
        assert ok["admitted"] > 0 and ok["stack_counts"]["completed"] >= ok["admitted"]
        # max_tokens 0: every stream ends with HTTP 200 and grpc-status INVALID_ARGUMENT
        with pytest.raises(RuntimeError, match="disagree"):
            load.phase(target, pids, "invalid", 1.0, 1, 16, 0, 2, "h2load", counters)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
