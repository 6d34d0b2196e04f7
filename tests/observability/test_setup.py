"""Tracing is opt-in: off without an endpoint, optional in the client SDK."""
from __future__ import annotations

import os
import subprocess
import sys

from dynabatch.cli.stack import LocalStack, StackConfig
from dynabatch.wire import telemetry


def test_no_endpoint_no_tracing(monkeypatch):
    for var in telemetry.ENDPOINT_VARS:
        monkeypatch.delenv(var, raising=False)
    assert telemetry.setup_tracing("dynabatch-test") is None
    assert telemetry.get_tracer("scheduler") is None


async def test_stack_without_provider_runs_no_tracing_hooks():
    async with LocalStack(StackConfig(engine="fake")) as stack:
        assert stack.scheduler.telemetry.tracer is None
        assert all(loop.tracing is None for loop in stack.loops)
        assert stack.scheduler.queue is stack.queue        # no traced wrapper


CLIENT_WITHOUT_OTEL = """
import sys
sys.modules["opentelemetry"] = None          # `import opentelemetry...` now fails
from dynabatch.client import DynabatchClient, build_request, tracing
from dynabatch.v1.scheduler_pb2 import GenerateResponse
assert tracing.tracer() is None
call, metadata = tracing.start(None, build_request("hi"), (("k", "v"),))
assert metadata == (("k", "v"),)
call.message(GenerateResponse(finish_reason=2)); call.error("CANCELLED", ""); call.end()
DynabatchClient("127.0.0.1:1").close()
assert not [m for m in sys.modules if m.startswith("opentelemetry") and sys.modules[m]]
print("ok")
"""


def test_client_sdk_works_without_opentelemetry():
    out = subprocess.run([sys.executable, "-c", CLIENT_WITHOUT_OTEL], capture_output=True,
                         text=True, env={**os.environ}, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
