"""The sidecar benchmark end to end on CPU (tiny model): the in-process engine and the whole
path (scheduler and worker processes, real Redis) both serve every request; the JSON holds
the ratio, the added latencies, every request's row and the engine's steps by kind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynabatch.bench import sidecar


@pytest.mark.parametrize("client_procs,schedulers,driver", [(1, 1, "sdk"), (2, 2, "many")])
def test_sidecar_runs_both_paths(redis_url: str, tmp_path: Path, client_procs: int,
                                 schedulers: int, driver: str) -> None:
    """With 2 client processes the requests are dealt between them and merged back: every
    request is there once, with its own times on the shared clock; with 2 schedulers on one
    port both serve (each counted in the CPU figures); with --client-driver many each client
    process sends its requests over one GenerateMany call."""
    out = tmp_path / "sidecar.json"
    assert sidecar.main(["--device", "cpu", "--requests", "6", "--prompt", "8", "--output", "4",
                         "--max-running", "8", "--redis-url", redis_url, "--out", str(out),
                         "--client-procs", str(client_procs),
                         "--schedulers", str(schedulers), "--client-driver", driver]) == 0
    res = json.loads(out.read_text())
    assert res["client_processes"] == client_procs and res["client_driver"] == driver
    stack = res["runs"]["stack_offline"]["raw"]
    cols = stack["request_columns"]
    rows = [dict(zip(cols, r)) for r in stack["requests"]]
    assert all(0 <= r["arrival_s"] < 5 and r["ttft_ms"] > 0 for r in rows)
    # the server's wall-clock hops, on the client's clock, in order: sent -> scheduler arrival
    # -> the first token's engine step ended -> relayed -> received (1 ms of clock rounding)
    assert all(-1 <= r["admit_ms"] <= r["first_step_ms"] + 1 <= r["relayed_ms"] + 2
               <= r["ttft_ms"] + 3 for r in rows), rows
    assert all(r["relayed_ms"] - r["admit_ms"] == pytest.approx(r["server_ttft_ms"], abs=1)
               for r in rows)
    assert res["throughput_ratio"] > 0 and res["moderate_rps"] > 0
    for name, run in res["runs"].items():
        assert run["counts"]["ok"] == 6, name
        assert len(run["raw"]["requests"]) == 6
        # the engine's steps in this run alone (the whole path's from the worker's metrics):
        # every prompt prefilled, each request's 4 tokens after the first need >= 3 decodes
        steps = run["meta"]["engine_steps"]
        assert 1 <= steps["prefill"]["steps"] <= 6 and steps["decode"]["steps"] >= 3, name
        assert steps["decode"]["seconds"] > 0 and steps["decode"]["mean_ms"] > 0, name
        if name.startswith("stack"):     # from the worker's metrics and the processes' CPU
            assert steps["stalled"]["seconds"] >= 0 and steps["gaps"]["seconds"] > 0, name
            cores = run["meta"]["cpu_cores"]
            want = {"scheduler", "scheduler1"} if schedulers == 2 else {"scheduler"}
            assert set(cores) == want | {"worker_serving", "engine"}, name
            # /proc counts CPU in 10-ms ticks: one process of a 6-request run may read 0
            assert min(cores.values()) >= 0 and cores["scheduler"] + cores["engine"] > 0, name
    assert set(res["added_at_moderate_load"]) == {"ttft_ms", "tpot_ms"}
    # the whole path's hops, in order, none negative beyond clock rounding; in-process has none
    hop_names = list(res["runs"]["stack_offline"]["hops_ms"])
    assert hop_names == ["send->scheduler", "scheduler->assigned", "assigned->first step",
                         "first step->relayed", "relayed->client", "last relayed->client"]
    assert all(q["p50"] >= -1 for q in res["runs"]["stack_offline"]["hops_ms"].values())
    assert "hops_ms" not in res["runs"]["direct_offline"]
