"""Latency-model fitting, metric definitions and the CLI seam."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from dynabatch.bench import commands
from dynabatch.bench.latency_model import fit_engine_bench, fit_mixed_steps, load_model
from dynabatch.bench.metrics import Outcome, RequestRecord, RunResult, percentile, summarize


def test_fit_recovers_known_coefficients(tmp_path: Path) -> None:
    truth = dict(base=2.0, seq=0.05, ctx=1e-5, tok=0.01, attn=2e-7)
    decode = [{"batch": b, "context_tokens": b * c, "ms": truth["base"] + truth["seq"] * b
               + truth["ctx"] * b * c} for b in (1, 8, 64, 256) for c in (256, 2048)]
    prefill = [{"tokens": t, "ms": truth["base"] + truth["tok"] * t + truth["attn"] * t * t / 2}
               for t in (128, 512, 2048, 8192)]
    doc = {"machine": {"gpu": "TestGPU"}, "model": "shape-x", "date": "2026-01-01",
           "kv_block_size": 32, "kv_blocks_total": 1234, "prefill": prefill, "decode": decode}
    path = tmp_path / "engine_test.json"
    path.write_text(json.dumps(doc))
    m = load_model(str(path))
    assert (m.kv_block_size, m.kv_blocks_total) == (32, 1234)
    assert m.provenance["gpu"] == "TestGPU" and "measured" in m.provenance["kind"]
    for got, want in ((m.base_ms, truth["base"]), (m.per_seq_ms, truth["seq"]),
                      (m.per_ctx_ms, truth["ctx"]), (m.prefill_tok_ms, truth["tok"]),
                      (m.prefill_attn_ms, truth["attn"])):
        assert got == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError):
        fit_engine_bench({"decode": decode[:2]})


def test_mixed_steps_pay_their_fitted_cost_not_the_lone_prompt_floor() -> None:
    """A chunk beside decodes costs the fitted fixed part plus its per-token work; a lone prompt
    still pays at least the floor (its own forward's launch overhead)."""
    import dataclasses
    m = dataclasses.replace(load_model("h200-llama1b"), prefill_floor_ms=20.0,
                            prefill_tok_ms=0.01, prefill_attn_ms=0.0)
    rows = [{"decodes": k, "context": c, "chunk": t, "split": True,
             "decode_ms": m.decode_ms(k, k * c), "mixed_ms": m.decode_ms(k, k * c) + 0.3 + 0.01 * t}
            for k in (1, 8) for c in (512, 4096) for t in (16, 64, 256)]
    rows.append({**rows[0], "split": False, "mixed_ms": 99.0})   # the unsplit kernel: ignored
    fitted = fit_mixed_steps(m, {"gpu": "TestGPU", "rows": rows})
    assert fitted.mixed_prefill_ms == pytest.approx(0.3)
    assert fitted.step_ms(4, 4096, 64) == pytest.approx(m.decode_ms(4, 4096) + 0.3 + 0.64)
    assert fitted.step_ms(0, 0, 64) == m.step_ms(0, 0, 64) == pytest.approx(m.base_ms + 20.0)
    assert m.step_ms(4, 4096, 64) == pytest.approx(m.decode_ms(4, 4096) + 20.0)   # unfitted
    with pytest.raises(ValueError):
        fit_mixed_steps(m, {"rows": []})


def test_shipped_models_carry_provenance() -> None:
    for name in ("h200-llama1b", "h200-llama8b-kv8g"):
        m = load_model(name)
        assert m.provenance["gpu"].startswith("NVIDIA H200")
        assert m.provenance["kind"]
        assert m.decode_ms(64, 64 * 1024) > m.decode_ms(1, 1024) > 0
    assert "derived" in load_model("h200-llama8b-kv8g").provenance["kind"]
    with pytest.raises(FileNotFoundError):
        load_model("no-such-model")


def _rec(i: int, outcome: Outcome, ttft: float = 0.1, tpot: float = 0.01) -> RequestRecord:
    r = RequestRecord(f"r{i}", float(i), 100, 11, ttft_target_s=0.5, tpot_target_s=0.02)
    r.outcome = outcome
    if outcome is Outcome.OK:
        r.assigned_s, r.first_token_s = i + 0.01, i + ttft
        r.finish_s = r.first_token_s + 10 * tpot
    return r


def test_attainment_counts_rejects_as_misses() -> None:
    recs = [_rec(0, Outcome.OK), _rec(1, Outcome.OK, ttft=0.9), _rec(2, Outcome.OK, tpot=0.05),
            _rec(3, Outcome.REJECTED), _rec(4, Outcome.OK)]
    s = summarize(RunResult(recs))
    assert s["sla_attainment"] == pytest.approx(2 / 5)
    assert s["counts"]["rejected"] == 1 and s["counts"]["ok"] == 4
    assert s["span_s"] == pytest.approx(4.2)
    assert s["goodput_rps"] == pytest.approx(2 / 4.2)
    assert s["throughput_rps"] == pytest.approx(4 / 4.2)
    assert s["output_tok_s"] == pytest.approx(44 / 4.2)
    assert s["tpot_ms"]["p50"] == pytest.approx(10.0)
    assert s["queue_ms"]["p50"] == pytest.approx(10.0)


def test_percentile_nearest_rank() -> None:
    v = list(range(1, 101))
    assert (percentile(v, 50), percentile(v, 90), percentile(v, 99), percentile(v, 100)) == (
        50, 90, 99, 100)
    assert percentile([], 50) != percentile([], 50)   # NaN


def test_cli_registers_subcommands_with_help() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    commands.add_subcommands(sub)
    for name in ("simulate", "replay", "capacity", "report"):
        assert name in sub.choices
    assert all(a.help for a in sub._choices_actions)


def test_cli_simulate_json(capsys) -> None:
    rc = commands.main(["simulate", "--synthetic", "poisson", "--n", "60", "--rate", "4",
                        "--policies", "fcfs,naive", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"fcfs", "naive"} and out["fcfs"]["requests"] == 60
    assert out["fcfs"]["meta"]["simulated"] is True


def test_cli_bad_trace_is_one_line(tmp_path: Path, capsys) -> None:
    rc = commands.main(["simulate", "--trace", str(tmp_path / "nope.csv")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "\n" not in err


def test_cli_report_writes_files(tmp_path: Path) -> None:
    rc = commands.main(["report", "--synthetic", "poisson", "--n", "80", "--rate", "3",
                        "--policies", "fcfs,dynamic", "--jobs", "1", "--out", str(tmp_path),
                        "--json"])
    assert rc == 0
    for f in ("REPORT.md", "report.json", "latency_cdf.png", "goodput_vs_load.png",
              "timeline.png"):
        assert (tmp_path / f).stat().st_size > 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data["capacity"]) == {"fcfs", "dynamic"} and data["simulated"] is True
    assert "| fcfs |" in (tmp_path / "REPORT.md").read_text()


def test_top_level_cli_bench_capacity_and_bad_policy(capsys) -> None:
    """Through `dynabatch` itself: bench subcommands take --policies, not --policy."""
    from dynabatch.cli import main as cli_main
    rc = cli_main(["bench", "capacity", "--synthetic", "poisson", "--n", "40", "--rate", "2",
                   "--policies", "fcfs", "--json"])
    assert rc == 0 and "fcfs" in json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "simulate", "--synthetic", "poisson", "--policies", "fcfs,bogus"])
    assert e.value.code == 2 and "'bogus'" in capsys.readouterr().err
