"""Metrics shared by the simulator and replay: per-request records in, one summary out.

Definitions (identical for both sources):
- TTFT = first token - arrival; TPOT = (finish - first token) / (output tokens - 1), 0 for one
  token; queue time = assignment to a worker - arrival.
- A request meets its SLA when it completed with TTFT <= its TTFT target and TPOT <= its TPOT
  target. Attainment = met / ALL requests offered (rejected, expired, failed and unfinished count
  as misses, so turning work away never raises attainment).
- Goodput = SLA-meeting requests per second; throughput = completed requests (and output tokens)
  per second; both over the span from the first arrival to the last completion.
- Latency percentiles are over completed requests.
"""
from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field


class Outcome(str, enum.Enum):
    PENDING = "pending"      # never finished (the run ended first)
    OK = "ok"
    REJECTED = "rejected"    # admission control (RESOURCE_EXHAUSTED)
    EXPIRED = "expired"      # waited past its queue deadline
    FAILED = "failed"        # any other error (replay)


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_target_s: float
    tpot_target_s: float
    assigned_s: float = -1.0
    first_token_s: float = -1.0
    finish_s: float = -1.0
    outcome: Outcome = Outcome.PENDING
    preemptions: int = 0
    # Replay only: the first token as the scheduler relayed it (its Timings.ttft_ms), so the
    # client-side TTFT splits into queue, worker + queue transport, and relay-to-client.
    server_first_token_s: float = -1.0
    # Replay only, from the server's wall-clock Timings (one machine, one clock): the request's
    # arrival at the scheduler, the end of the engine step that made its first token, that
    # token relayed (each hop of the TTFT between the client's send and its receipt), and the
    # last token relayed (the end of the request's stream in the scheduler).
    server_arrival_s: float = -1.0
    first_step_end_s: float = -1.0
    first_relayed_s: float = -1.0
    last_relayed_s: float = -1.0

    @property
    def ttft(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot(self) -> float:
        n = self.output_tokens - 1
        return (self.finish_s - self.first_token_s) / n if n > 0 else 0.0

    @property
    def met(self) -> bool:
        # A tiny tolerance: simulated times are sums of floats.
        return (self.outcome is Outcome.OK and self.ttft <= self.ttft_target_s + 1e-9
                and self.tpot <= self.tpot_target_s + 1e-9)


@dataclass(slots=True)
class TimelineSample:
    t: float
    worker: str
    batch: float            # mean running batch over the feedback period
    running: int
    kv_used: float          # share of the worker's KV blocks in use
    waiting: int            # scheduler queue
    worker_queue: int       # assigned, not yet running (live: waiting inside the engine)
    preemptions: int = 0    # the worker's preemptions so far
    decode_step_ms: float = 0.0       # as the worker reports it (feedback)
    step_prefill_tokens: int = 0      # its engine's cap on a step's prompt tokens (0: none)


@dataclass
class RunResult:
    records: list[RequestRecord]
    timeline: list[TimelineSample] = field(default_factory=list)
    label: str = ""
    meta: dict = field(default_factory=dict)


RECORD_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens", "queue_ms", "server_ttft_ms",
                  "ttft_ms", "tpot_ms", "outcome", "admit_ms", "first_step_ms", "relayed_ms",
                  "last_relayed_ms", "finish_ms")
TIMELINE_COLUMNS = ("t", "running", "kv_used", "waiting", "worker_queue", "preemptions",
                    "decode_step_ms", "step_prefill_tokens")


def raw_rows(result: RunResult) -> dict:
    """Every request and timeline sample as compact rows (for diagnosing tails after the fact);
    a time a request never reached is null."""
    def ms(start: float, end: float) -> float | None:
        return round((end - start) * 1000, 2) if start >= 0 and end >= 0 else None
    reqs = [[round(r.arrival_s, 4), r.prompt_tokens, r.output_tokens,
             ms(r.arrival_s, r.assigned_s), ms(r.arrival_s, r.server_first_token_s),
             ms(r.arrival_s, r.first_token_s),
             round(r.tpot * 1000, 3) if r.outcome is Outcome.OK else None, r.outcome.value,
             ms(r.arrival_s, r.server_arrival_s), ms(r.arrival_s, r.first_step_end_s),
             ms(r.arrival_s, r.first_relayed_s), ms(r.arrival_s, r.last_relayed_s),
             ms(r.arrival_s, r.finish_s)]
            for r in result.records]
    timeline = [[round(x.t, 3), x.running, round(x.kv_used, 4), x.waiting, x.worker_queue,
                 x.preemptions, round(x.decode_step_ms, 3), x.step_prefill_tokens]
                for x in result.timeline]
    return {"request_columns": list(RECORD_COLUMNS), "requests": reqs,
            "timeline_columns": list(TIMELINE_COLUMNS), "timeline": timeline}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of an ascending list; NaN when empty."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def _pcts(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    v = sorted(values)
    return {f"p{q}": percentile(v, q) * scale for q in (50, 90, 99)} | {
        "mean": (sum(v) / len(v) * scale) if v else math.nan}


def summarize(result: RunResult) -> dict:
    """The summary dict of one run (times in ms in the latency blocks, seconds elsewhere)."""
    recs = result.records
    n = len(recs)
    done = [r for r in recs if r.outcome is Outcome.OK]
    counts = {o.value: 0 for o in Outcome}
    for r in recs:
        counts[r.outcome.value] += 1
    start = min((r.arrival_s for r in recs), default=0.0)
    end = max([r.finish_s for r in done] + [r.arrival_s for r in recs] or [0.0])
    span = max(end - start, 1e-9)
    met = sum(1 for r in done if r.met)
    out_tokens = sum(r.output_tokens for r in done)
    arrivals_span = max(r.arrival_s for r in recs) - start if n > 1 else 0.0
    tl = result.timeline
    summary = {
        "label": result.label,
        "requests": n,
        "offered_rps": (n - 1) / arrivals_span if arrivals_span > 0 else math.nan,
        "counts": counts,
        "span_s": span,
        "throughput_rps": len(done) / span,
        "output_tok_s": out_tokens / span,
        "goodput_rps": met / span,
        "sla_attainment": met / n if n else math.nan,
        "ttft_ms": _pcts([r.ttft for r in done]),
        "tpot_ms": _pcts([r.tpot for r in done if r.output_tokens > 1]),
        "queue_ms": _pcts([r.assigned_s - r.arrival_s for r in recs if r.assigned_s >= 0]),
        "e2e_ms": _pcts([r.finish_s - r.arrival_s for r in done]),
        "preempted_requests": sum(1 for r in recs if r.preemptions),
        "mean_batch": sum(s.batch for s in tl) / len(tl) if tl else math.nan,
        "mean_kv_used": sum(s.kv_used for s in tl) / len(tl) if tl else math.nan,
        "max_kv_used": max((s.kv_used for s in tl), default=math.nan),
        "meta": {k: v for k, v in result.meta.items() if k != "provenance"},
    }
    return summary


def littles_law(result: RunResult) -> tuple[float, float]:
    """(L measured by the run's time integral of requests in system, lambda * W from records).

    Only for runs whose meta carries ``in_system_area`` (the simulator's)."""
    recs = [r for r in result.records if r.outcome is not Outcome.REJECTED]
    start = min(r.arrival_s for r in recs)
    ends = [r.finish_s for r in recs if r.outcome is Outcome.OK]
    end = max(ends + [r.arrival_s for r in recs])
    sojourn = sum(r.finish_s - r.arrival_s for r in recs if r.outcome is Outcome.OK)
    lam = len(recs) / (end - start)
    w = sojourn / len(recs)
    return result.meta["in_system_area"] / (end - start), lam * w


def records_to_json(result: RunResult) -> list[dict]:
    return [asdict(r) | {"outcome": r.outcome.value} for r in result.records]



def _span(start: float, end: float) -> float | None:
    return end - start if start >= 0 and end >= 0 else None


# Each hop of a streamed request on the whole path, from the replay's records (one clock). The
# server's queue time is its own interval (Timings.queue_ms = assigned_s - arrival_s).
HOPS = {"send->scheduler": lambda r: _span(r.arrival_s, r.server_arrival_s),
        "scheduler->assigned": lambda r: _span(r.arrival_s, r.assigned_s),
        "assigned->first step": lambda r: _span(r.server_arrival_s + (r.assigned_s - r.arrival_s),
                                                r.first_step_end_s),
        "first step->relayed": lambda r: _span(r.first_step_end_s, r.first_relayed_s),
        "relayed->client": lambda r: _span(r.first_relayed_s, r.first_token_s),
        "last relayed->client": lambda r: _span(r.last_relayed_s, r.finish_s)}


def hops(result: RunResult) -> dict[str, dict[str, float]]:
    """Where a whole-path run's TTFT (and its stream's end) went, hop by hop, in ms; {} when the
    server sent no wall-clock Timings ("first step" = the end of the engine step that made the
    first token)."""
    done = [r for r in result.records if r.outcome is Outcome.OK and r.server_arrival_s >= 0
            and r.assigned_s >= 0]
    out = {}
    for name, hop in HOPS.items():
        vals = [v for v in map(hop, done) if v is not None]
        if vals:
            out[name] = {k: round(v, 3) for k, v in _pcts(vals).items()} | {
                "max": round(max(vals) * 1000, 3)}
    return out
