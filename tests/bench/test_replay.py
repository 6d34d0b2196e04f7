"""Replay 50 requests open-loop against a local in-process stack (CPU, model-free engine) and
check the replay's counts against the client's own and the server's."""
from __future__ import annotations

import pytest

from dynabatch.bench.metrics import Outcome, summarize
from dynabatch.bench.traces import Trace, TraceRequest, poisson

client = pytest.importorskip("dynabatch.client")
if not all(hasattr(client, n) for n in ("AsyncDynabatchClient", "DynabatchError",
                                        "ResourceExhausted")):
    pytest.skip("client SDK not complete yet", allow_module_level=True)
stack = pytest.importorskip("dynabatch.cli.stack")


def _trace(n: int = 50) -> Trace:
    base = poisson(40.0, n, seed=3)   # ~1.2 s of arrivals
    return Trace([TraceRequest(r.arrival_s, 8 + i % 40, 1 + (7 * i) % 24)
                  for i, r in enumerate(base.requests)], "test")


@pytest.mark.parametrize("many", [False, True])
async def test_replay_matches_client_counts(many: bool, monkeypatch) -> None:
    """Through a Generate call per request, or all of them over one GenerateMany call."""
    from dynabatch.bench.replay import replay
    from dynabatch.client.many import ManyCall
    over_many = []
    real_stream = ManyCall.stream

    def counted(self, *args, **kwargs):
        over_many.append(self)
        return real_stream(self, *args, **kwargs)
    monkeypatch.setattr(ManyCall, "stream", counted)
    trace = _trace()
    cfg = stack.StackConfig(engine="fake", policy="dynamic")
    async with stack.LocalStack(cfg) as s:
        run = await replay(trace, s.target, ttft_target_s=5.0, tpot_target_s=1.0, vocab=250,
                           many=many)
    assert len(over_many) == (50 if many else 0) and len(set(over_many)) == int(many)
    summary = summarize(run)
    ok = [r for r in run.records if r.outcome is Outcome.OK]
    assert summary["requests"] == 50
    assert summary["counts"]["ok"] == len(ok) == 50
    assert sum(r.output_tokens for r in ok) == sum(t.output_tokens for t in trace.requests)
    assert run.meta["server_counts"]["completed"] == summary["counts"]["ok"]
    assert run.meta["server_counts"]["rejected"] == summary["counts"]["rejected"]
    assert all(0 <= r.arrival_s <= r.first_token_s <= r.finish_s for r in ok)
    # open loop: sends follow the trace's timestamps, not the responses
    lag = max(abs(r.arrival_s - t.arrival_s) for r, t in zip(run.records, trace.requests))
    assert lag < 0.25
    assert summary["sla_attainment"] == pytest.approx(1.0)
    assert run.timeline, "GetStats was polled"
