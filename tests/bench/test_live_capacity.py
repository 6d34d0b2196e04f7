"""The live capacity sweep: real scheduler and worker processes (model-free engine), real Redis,
real gRPC; checks the sweep's bookkeeping (grid order, early stop, capacity, JSON) end to end."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dynabatch.bench import live_capacity as live
from dynabatch.bench.traces import poisson


def test_parse_point() -> None:
    p = live.parse_point("fcfs:max_num_seqs=32,b_max=8@3,1.5")
    assert (p.policy, p.opts, p.rates) == ("fcfs", ("max_num_seqs=32", "b_max=8"), (1.5, 3.0))
    assert p.label == "fcfs[max_num_seqs=32,b_max=8]"
    assert live.parse_point("dynamic@2").label == "dynamic"
    for bad in ("fcfs", "@2", "fcfs@", "fcfs@x", "fcfs@0", "bogus@1"):
        with pytest.raises(ValueError):
            live.parse_point(bad)


def test_segment_has_rate_x_seconds_requests_at_that_rate() -> None:
    t = poisson(1.0, 500, seed=1)
    seg = live.segment(t, 8.0, 10.0)
    assert len(seg) == 80 and seg.requests[0].arrival_s == 0
    assert seg.mean_rps == pytest.approx(8.0)
    assert len(live.segment(t, 0.1, 10.0)) == 20          # never fewer than min_requests


def test_live_sweep_with_processes(redis_url: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "live.json"
    # naive with a 3 s window cannot meet a 1 s TTFT target: its first rate misses, the next
    # is skipped; fcfs meets it.
    rc = live.main(["--synthetic", "poisson", "--n", "200", "--rate", "4", "--engine", "fake",
                    "--max-prompt", "48", "--max-output", "16", "--seconds", "2",
                    "--ttft-ms", "1000", "--tpot-ms", "1000", "--redis-url", redis_url,
                    "--point", "fcfs@8", "--point", "naive:naive_window_s=3@4,8",
                    "--warmup-s", "1", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["warmup"] == {"requests": 8, "rps": 8.0, "seconds": 1.0}   # not in any point
    runs = [(p["label"], p["target_rps"]) for p in data["points"]]
    assert runs == [("fcfs", 8.0), ("naive[naive_window_s=3]", 4.0)]
    assert data["capacity_rps"] == {"fcfs": 8.0, "naive[naive_window_s=3]": 0.0}
    assert data["skipped"] == [{"label": "naive[naive_window_s=3]", "rates": [8.0],
                                "why": "a lower rate missed the goal"}]
    fcfs8 = data["points"][0]
    assert fcfs8["segment_requests"] == 20 and fcfs8["counts"]["ok"] == 20
    raw = fcfs8["raw"]
    col = {c: i for i, c in enumerate(raw["request_columns"])}
    assert len(raw["requests"]) == 20 and raw["timeline"]
    # server-side intervals fit inside the client's: queue <= first token relayed <= received
    assert all(r[col["outcome"]] == "ok"
               and 0 <= r[col["queue_ms"]] <= r[col["server_ttft_ms"]] <= r[col["ttft_ms"]]
               for r in raw["requests"])
    assert data["points"][1]["sla_attainment"] < 0.99
    import redis
    mine = f"dynabatch-live-{os.getpid()}:*"
    assert not list(redis.Redis.from_url(redis_url).scan_iter(match=mine))
