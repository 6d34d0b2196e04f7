"""Trace loaders on small files the tests write (all three formats, with bad rows)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynabatch.bench import traces as tr


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_azure_with_bad_rows(tmp_path: Path) -> None:
    p = _write(tmp_path / "azure.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
               "2023-11-16 18:15:46.6805900,374,44\n"
               "2023-11-16 18:15:50.9951690,396,109\n"
               "not a time,10,10\n"                      # bad timestamp
               "2023-11-16 18:15:51.2224670,abc,55\n"    # bad number
               "2023-11-16 18:15:51.3910170,91,0\n"      # zero output
               "2023-11-16 18:15:52.3910170,91\n")       # missing field
    t = tr.load_trace(p)
    assert len(t) == 2 and t.skipped == 4
    assert t.requests[0].arrival_s == 0.0
    assert t.requests[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert (t.requests[1].prompt_tokens, t.requests[1].output_tokens) == (396, 109)


def test_burstgpt_with_bad_rows(tmp_path: Path) -> None:
    p = _write(tmp_path / "burst.csv",
               "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
               "5,ChatGPT,472,18,490,Conversation log\n"
               "2,ChatGPT,1087,0,1087,Conversation log\n"   # failed call: 0 response tokens
               "9,GPT-4,300,120,420,API log\n"
               "x,GPT-4,300,120,420,API log\n")
    t = tr.load_trace(p)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in t.requests] == [
        (0.0, 472, 18), (4.0, 300, 120)]
    assert t.skipped == 2


def test_mooncake_with_bad_rows(tmp_path: Path) -> None:
    rows = [{"timestamp": 1000, "input_length": 100, "output_length": 10, "hash_ids": [1, 2]},
            {"timestamp": 0, "input_length": 50, "output_length": 5, "hash_ids": []},
            {"timestamp": 2500, "input_length": -1, "output_length": 5}]
    p = _write(tmp_path / "mc.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n{broken\n\n")
    t = tr.load_trace(p)
    assert [(r.arrival_s, r.prompt_tokens) for r in t.requests] == [(0.0, 50), (1.0, 100)]
    assert t.skipped == 2


def test_unreadable_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(tr.TraceError) as e:
        tr.load_trace(tmp_path / "missing.csv")
    assert "\n" not in str(e.value)
    p = _write(tmp_path / "other.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(tr.TraceError, match="unknown trace format"):
        tr.load_trace(p)
    with pytest.raises(tr.TraceError, match="missing columns"):
        tr.load_azure(p)
    b = tmp_path / "bin.csv"
    b.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(tr.TraceError):
        tr.load_azure(b)


def test_transforms() -> None:
    t = tr.Trace([tr.TraceRequest(float(i), 100 * (i + 1), 10 * (i + 1)) for i in range(11)])
    assert t.mean_rps == pytest.approx(1.0)
    assert tr.scale_rate(t, 4).mean_rps == pytest.approx(4.0)
    assert tr.to_rps(t, 2.5).mean_rps == pytest.approx(2.5)
    w = tr.window(t, 2, 8, first_n=3)
    assert [r.prompt_tokens for r in w.requests] == [300, 400, 500] and w.requests[0].arrival_s == 0
    c = tr.cap_lengths(t, max_prompt=500, max_output=50, max_model_len=520)
    assert max(r.prompt_tokens for r in c.requests) == 500
    assert all(r.prompt_tokens + r.output_tokens <= 520 for r in c.requests)
    assert [r.output_tokens for r in c.requests] == [10, 20, 30, 40] + [20] * 7


@pytest.mark.parametrize("gen", [tr.poisson, tr.gamma_bursty])
def test_synthetic_rate_and_seed(gen) -> None:
    a, b = gen(10.0, 4000, seed=3), gen(10.0, 4000, seed=3)
    assert a.requests == b.requests
    assert a.mean_rps == pytest.approx(10.0, rel=0.15)
    assert gen(10.0, 100, seed=4).requests != a.requests[:100]


def test_gamma_is_burstier_than_poisson() -> None:
    def cv(t: tr.Trace) -> float:
        gaps = [b.arrival_s - a.arrival_s for a, b in zip(t.requests, t.requests[1:])]
        m = sum(gaps) / len(gaps)
        return (sum((g - m) ** 2 for g in gaps) / len(gaps)) ** 0.5 / m
    assert cv(tr.poisson(5, 5000, seed=1)) == pytest.approx(1.0, abs=0.1)
    assert cv(tr.gamma_bursty(5, 5000, cv=3.0, seed=1)) > 2.0
