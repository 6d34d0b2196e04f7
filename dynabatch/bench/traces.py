"""Workload traces: loaders for public LLM traces, synthetic generators, and transforms.

Every loader returns a :class:`Trace` whose arrivals start at 0 s and are sorted. Rows that cannot
be parsed (missing fields, non-numbers, negative or zero lengths) are skipped and counted in
``Trace.skipped`` rather than aborting a long load; a file that cannot be opened or has none of
the expected columns raises :class:`TraceError` with a one-line message.
"""
from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Iterator


class TraceError(Exception):
    """A trace file that cannot be read at all (the message is one line, fit for a CLI)."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass
class Trace:
    requests: list[TraceRequest]
    source: str = "synthetic"
    skipped: int = 0
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    @property
    def mean_rps(self) -> float:
        """Arrivals per second over the span of the trace ((n-1) gaps over the span)."""
        n = len(self.requests)
        return (n - 1) / self.duration_s if n > 1 and self.duration_s > 0 else 0.0

    def describe(self) -> str:
        if not self.requests:
            return f"{self.source}: empty ({self.skipped} bad rows skipped)"
        p = sorted(r.prompt_tokens for r in self.requests)
        o = sorted(r.output_tokens for r in self.requests)
        return (f"{self.source}: {len(self)} requests over {self.duration_s:.1f} s "
                f"({self.mean_rps:.2f} req/s), prompt mean {sum(p) / len(p):.0f} / p50 "
                f"{p[len(p) // 2]}, output mean {sum(o) / len(o):.0f} / p50 {o[len(o) // 2]}, "
                f"{self.skipped} bad rows skipped")


# --------------------------------------------------------------------------- loaders

def _rebase(rows: list[TraceRequest], source: str, skipped: int) -> Trace:
    rows.sort(key=lambda r: r.arrival_s)
    t0 = rows[0].arrival_s if rows else 0.0
    return Trace([replace(r, arrival_s=r.arrival_s - t0) for r in rows], source, skipped)


def _valid(arrival: float, prompt: int, output: int) -> bool:
    return math.isfinite(arrival) and prompt > 0 and output > 0


def _keep(rows: list[TraceRequest], req: TraceRequest | None) -> int:
    """Append a parsed, valid row; return 1 (one bad row skipped) otherwise."""
    if req is None or not _valid(req.arrival_s, req.prompt_tokens, req.output_tokens):
        return 1
    rows.append(req)
    return 0


def _parse_time(value: str) -> float:
    """Seconds as a float, or an ISO date-time (Azure's '2023-11-16 18:15:46.6805900')."""
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(value.strip()).timestamp()


def _load_csv(path: Path, time_col: str, prompt_col: str, output_col: str,
              keep: Callable[[dict], bool] = lambda row: True) -> Trace:
    rows: list[TraceRequest] = []
    skipped = 0
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in (time_col, prompt_col, output_col) if c not in header]
            if missing:
                raise TraceError(f"{path}: not a recognised trace (missing columns {missing}; "
                                 f"found {header[:8]})")
            reader.fieldnames = header
            for row in reader:
                try:
                    if not keep(row):
                        continue
                    req = TraceRequest(_parse_time(row[time_col]), int(float(row[prompt_col])),
                                       int(float(row[output_col])))
                except (TypeError, ValueError, KeyError):
                    req = None
                skipped += _keep(rows, req)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TraceError(f"{path}: cannot read trace ({type(e).__name__}: {e})") from None
    return _rebase(rows, str(path), skipped)


def load_azure(path: str | Path) -> Trace:
    """Azure LLM inference trace 2023 (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    return _load_csv(Path(path), "TIMESTAMP", "ContextTokens", "GeneratedTokens")


def load_burstgpt(path: str | Path) -> Trace:
    """BurstGPT (Timestamp, Model, Request tokens, Response tokens, Total tokens, Log Type).

    Rows with 0 response tokens are failed calls in BurstGPT: they cannot be replayed, so they are
    skipped and counted like any other bad row.
    """
    return _load_csv(Path(path), "Timestamp", "Request tokens", "Response tokens")


def load_mooncake(path: str | Path) -> Trace:
    """Mooncake JSONL: {"timestamp": ms, "input_length": n, "output_length": n, "hash_ids": [...]}."""
    path = Path(path)
    rows: list[TraceRequest] = []
    skipped = 0
    try:
        with path.open() as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    req = TraceRequest(float(obj["timestamp"]) / 1000.0, int(obj["input_length"]),
                                       int(obj["output_length"]))
                except (ValueError, KeyError, TypeError):
                    req = None
                skipped += _keep(rows, req)
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: cannot read trace ({type(e).__name__}: {e})") from None
    if not rows and skipped:
        raise TraceError(f"{path}: no valid Mooncake rows ({skipped} bad lines)")
    return _rebase(rows, str(path), skipped)


FORMATS: dict[str, Callable[[str | Path], Trace]] = {
    "azure": load_azure, "burstgpt": load_burstgpt, "mooncake": load_mooncake}


def sniff_format(path: str | Path) -> str:
    """Guess the format from the first line (header for CSV, a JSON object for Mooncake)."""
    try:
        with Path(path).open() as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: cannot read trace ({type(e).__name__}: {e})") from None
    if first.lstrip().startswith("{"):
        return "mooncake"
    if "ContextTokens" in first:
        return "azure"
    if "Request tokens" in first:
        return "burstgpt"
    raise TraceError(f"{path}: unknown trace format (header {first.strip()[:80]!r}); "
                     f"pass --format {'/'.join(FORMATS)}")


def load_trace(path: str | Path, fmt: str = "auto") -> Trace:
    fmt = sniff_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise TraceError(f"unknown trace format {fmt!r} (choose from {', '.join(FORMATS)})")
    return FORMATS[fmt](path)


# --------------------------------------------------------------------------- synthetic

LengthSampler = Callable[[random.Random], tuple[int, int]]


def lognormal_lengths(prompt_mean: float = 1155, output_mean: float = 211,
                      sigma: float = 0.9) -> LengthSampler:
    """Log-normal prompt and output lengths with the given means (defaults: Azure conv means)."""
    def sample(rng: random.Random) -> tuple[int, int]:
        mu_p = math.log(prompt_mean) - sigma * sigma / 2
        mu_o = math.log(output_mean) - sigma * sigma / 2
        return max(1, int(rng.lognormvariate(mu_p, sigma))), max(1, int(rng.lognormvariate(mu_o, sigma)))
    return sample


def resample_lengths(trace: Trace) -> LengthSampler:
    """Draw (prompt, output) pairs from an existing trace's empirical distribution."""
    pairs = [(r.prompt_tokens, r.output_tokens) for r in trace.requests]
    return lambda rng: rng.choice(pairs)


def _generate(gaps: Iterator[float], n: int, lengths: LengthSampler, rng: random.Random,
              source: str) -> Trace:
    t, rows = 0.0, []
    for _ in range(n):
        p, o = lengths(rng)
        rows.append(TraceRequest(t, p, o))
        t += next(gaps)
    return Trace(rows, source)


def poisson(rate_rps: float, n: int, lengths: LengthSampler | None = None, seed: int = 0) -> Trace:
    """Poisson arrivals (exponential gaps) at ``rate_rps``."""
    rng = random.Random(seed)
    gaps = iter(lambda: rng.expovariate(rate_rps), None)
    return _generate(gaps, n, lengths or lognormal_lengths(), rng, f"poisson({rate_rps:g} rps)")


def gamma_bursty(rate_rps: float, n: int, cv: float = 3.0, lengths: LengthSampler | None = None,
                 seed: int = 0) -> Trace:
    """Gamma-distributed gaps with mean 1/rate and coefficient of variation ``cv`` (cv=1 is
    Poisson; larger is burstier: shape k = 1/cv^2, scale = cv^2/rate)."""
    rng = random.Random(seed)
    shape, scale = 1.0 / (cv * cv), cv * cv / rate_rps
    gaps = iter(lambda: rng.gammavariate(shape, scale), None)
    return _generate(gaps, n, lengths or lognormal_lengths(), rng,
                     f"gamma({rate_rps:g} rps, cv={cv:g})")


# --------------------------------------------------------------------------- transforms

def _with(trace: Trace, rows: Iterable[TraceRequest], note: str) -> Trace:
    return Trace(list(rows), trace.source, trace.skipped, trace.notes + [note])


def scale_rate(trace: Trace, factor: float) -> Trace:
    """Compress inter-arrival times by ``factor`` (x2 = twice the request rate)."""
    if factor <= 0:
        raise ValueError("rate factor must be > 0")
    return _with(trace, (replace(r, arrival_s=r.arrival_s / factor) for r in trace.requests),
                 f"rate x{factor:g}")


def to_rps(trace: Trace, target_rps: float) -> Trace:
    """Rescale arrivals so that the trace's mean rate is ``target_rps``."""
    if trace.mean_rps <= 0:
        raise ValueError("trace has no measurable rate (fewer than 2 arrivals)")
    return scale_rate(trace, target_rps / trace.mean_rps)


def window(trace: Trace, start_s: float = 0.0, end_s: float = math.inf,
           first_n: int | None = None) -> Trace:
    """Arrivals in [start_s, end_s), then at most the first ``first_n``; re-based to 0 s."""
    rows = [r for r in trace.requests if start_s <= r.arrival_s < end_s][:first_n]
    t0 = rows[0].arrival_s if rows else 0.0
    return _with(trace, (replace(r, arrival_s=r.arrival_s - t0) for r in rows),
                 f"window [{start_s:g}, {end_s:g}) first {first_n}")


def cap_lengths(trace: Trace, max_prompt: int | None = None, max_output: int | None = None,
                max_model_len: int | None = None) -> Trace:
    """Clip prompt and output lengths; with ``max_model_len``, prompt + output fits the context
    (the prompt keeps at most max_model_len - 1 tokens, the output what is left)."""
    def cap(r: TraceRequest) -> TraceRequest:
        p = min(r.prompt_tokens, max_prompt or r.prompt_tokens)
        o = min(r.output_tokens, max_output or r.output_tokens)
        if max_model_len:
            p = min(p, max_model_len - 1)
            o = min(o, max_model_len - p)
        return TraceRequest(r.arrival_s, p, o)
    return _with(trace, map(cap, trace.requests),
                 f"caps prompt {max_prompt} output {max_output} context {max_model_len}")
