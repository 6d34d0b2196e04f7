"""The sidecar benchmark end to end on CPU (tiny model): the in-process engine and the whole
path (scheduler and worker processes, real Redis) both serve every request; the JSON holds
the ratio, the added latencies and every request's row."""
from __future__ import annotations

import json
from pathlib import Path

from dynabatch.bench import sidecar


def test_sidecar_runs_both_paths(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "sidecar.json"
    assert sidecar.main(["--device", "cpu", "--requests", "6", "--prompt", "8", "--output", "4",
                         "--max-running", "8", "--redis-url", redis_url, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["throughput_ratio"] > 0 and res["moderate_rps"] > 0
    for name, run in res["runs"].items():
        assert run["counts"]["ok"] == 6, name
        assert len(run["raw"]["requests"]) == 6
    assert set(res["added_at_moderate_load"]) == {"ttft_ms", "tpot_ms"}
