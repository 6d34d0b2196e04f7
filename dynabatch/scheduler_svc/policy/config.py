"""Every knob of the batching policies, with defaults, and the named presets.

The nine policy names are configurations of one implementation (policies.BatchingPolicy): a
preset only overrides fields of PolicyConfig.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

Batching = Literal["continuous", "static", "window"]
Controller = Literal["fixed", "dynamic"]
Ordering = Literal["fifo", "priority"]
BinKey = Literal["output", "prompt"]


@dataclass(frozen=True)
class PolicyConfig:
    # --- shape of the policy (set by presets) ---
    # continuous: top up running batches every decision; static: fixed batch B to an idle worker,
    # sent when B wait or the oldest waited static_timeout_s; window: everything that arrived in
    # a naive_window_s window to an idle worker. static and window run batches to completion.
    batching: Batching = "continuous"
    # fixed: b_target = max_num_seqs (vLLM's default); dynamic: min(b_mem, b_SLA) (Alg. 1 + 2).
    controller: Controller = "dynamic"
    ordering: Ordering = "priority"          # fifo: arrival order (resumed first)
    num_bins: int = 1                        # > 1: multi-bin (per-bin controllers)
    bin_key: BinKey = "output"               # bin by predicted output, or prompt (coalescing)
    # False (default): plan KV for prompt and generated tokens only, as vLLM admits, and let the
    # worker preempt (recompute) when sequences outgrow memory; Alg. 1's b_mem, from measured
    # blocks per sequence, keeps the batch inside eta of the pool. True: also reserve the
    # predicted output, which never preempts but holds blocks for tokens not generated yet: it
    # lost capacity in every simulated Azure setting (8B KV 2 GiB 3.11 vs 3.47 req/s, 8B KV 8 GiB
    # 7.51 vs 7.80, 1B equal; bench/results/e2e_h200/REPORT.md).
    reserve_output: bool = False

    # --- Algorithm 1: memory ---
    b_min: int = 1
    b_max: int = 256
    eta: float = 0.95                 # memory factor: share of KV blocks the batch may plan on
    few_running: int = 4              # below this many running, blocks/seq come from predictions

    # --- Algorithm 2: SLA band on measured per-token decode latency ---
    tpot_target_s: float = 0.05       # default TPOT target (per output token)
    ttft_target_s: float = 2.0        # default TTFT target
    eps: float = 0.02                 # dead band, as a fraction of the TPOT target
    alpha: int = 16                   # cap on the band's growth (sequences) under the target
    delta: int = 8                    # cap on b_low's decrease (sequences) on a violation
    sla_step: float = 0.05            # band steps are this share of the batch (>= 1 sequence)
    # The dynamic controller also caps each engine step's prompt tokens so that decodes riding
    # along stay inside the TPOT target (prefill_cap.py; engines with mixed steps).
    sla_prefill: bool = True
    # The cap may grow past that step rule to what the decoding requests' TPOT budgets leave,
    # spread over this horizon (how often a cap is refreshed: the workers' feedback); 0: the
    # step rule alone (the cap of sessions 15-19).
    step_cap_horizon_s: float = 0.25

    # --- selection ---
    max_wait_s: float = 10.0          # past it a request is forced in whenever memory allows
    short_job_weight: float = 1.0     # bonus = weight / (1 + predicted / short_job_tokens)
    short_job_tokens: int = 128
    prefill_token_budget: int = 8192  # prompt tokens sent to one worker per decision (TTFT)

    # --- admission ---
    max_queue_requests: int = 10_000
    max_queue_tokens: int = 4_000_000  # prompt + max_tokens of all waiting requests
    admission_smoothing_s: float = 5.0  # time constant of the service-rate estimate (0: none)

    # --- baselines ---
    max_num_seqs: int = 256           # fcfs (controller=fixed): vLLM's default
    static_batch_size: int = 8        # static
    static_timeout_s: float = 1.0
    naive_window_s: float = 0.5       # window

    # --- length prediction and bins ---
    predict_quantile: float = 0.5     # of recent outputs in the prompt-length bucket
    predict_min_samples: int = 8
    history_size: int = 512           # completions kept per bucket and for bin boundaries
    bin_refresh: int = 200            # completions between bin-boundary re-estimates

    # --- workers ---
    stale_heartbeat_s: float = 5.0

    def __post_init__(self) -> None:
        for name, choices in (("batching", Batching), ("controller", Controller),
                              ("ordering", Ordering), ("bin_key", BinKey)):
            if getattr(self, name) not in get_args(choices):
                raise ValueError(f"{name} must be one of {', '.join(get_args(choices))}")
        checks = {
            "1 <= b_min <= b_max": 1 <= self.b_min <= self.b_max,
            "0 < eta <= 1": 0.0 < self.eta <= 1.0,
            "0 <= predict_quantile <= 1": 0.0 <= self.predict_quantile <= 1.0,
            "tpot_target_s, max_wait_s, short_job_tokens > 0":
                min(self.tpot_target_s, self.max_wait_s, self.short_job_tokens) > 0,
            "num_bins, max_num_seqs, static_batch_size, history_size, bin_refresh >= 1":
                min(self.num_bins, self.max_num_seqs, self.static_batch_size, self.history_size,
                    self.bin_refresh) >= 1,
            "eps, alpha, delta, sla_step, ttft_target_s, admission_smoothing_s >= 0":
                min(self.eps, self.alpha, self.delta, self.sla_step, self.ttft_target_s,
                    self.admission_smoothing_s) >= 0,
        }
        bad = [rule for rule, ok in checks.items() if not ok]
        if bad:
            raise ValueError("PolicyConfig needs " + "; ".join(bad))


# Each name sets these fields, unless the config it is given sets them to non-default values.
# SLA targets are never part of a preset: they are the operator's, whatever the policy.
PRESETS: dict[str, dict[str, object]] = {
    # Baselines (honest comparison): seed 002's static_fifo, seed 000's naive window, vLLM FCFS.
    "static": dict(batching="static", controller="fixed", ordering="fifo", num_bins=1),
    "naive": dict(batching="window", controller="fixed", ordering="fifo", num_bins=1),
    "fcfs": dict(batching="continuous", controller="fixed", ordering="fifo", num_bins=1),
    # Alg. 1 + 2 on one queue, and with K bins by predicted output length.
    "dynamic": dict(batching="continuous", controller="dynamic", ordering="priority", num_bins=1),
    "multibin": dict(batching="continuous", controller="dynamic", ordering="priority",
                     num_bins=4, bin_key="output"),
    # Seed 001's strategies as configurations of the dynamic policy.
    "latency": dict(batching="continuous", controller="dynamic", ordering="priority", num_bins=1,
                    b_max=32, prefill_token_budget=2048, short_job_weight=2.0),
    "throughput": dict(batching="continuous", controller="dynamic", ordering="priority",
                       num_bins=1, b_max=512, eta=0.98, prefill_token_budget=32768,
                       short_job_weight=0.25),
    "coalescing": dict(batching="continuous", controller="dynamic", ordering="priority",
                       num_bins=4, bin_key="prompt"),
    "adaptive": dict(batching="continuous", controller="dynamic", ordering="priority",
                     num_bins=1),
}

POLICY_NAMES: tuple[str, ...] = tuple(PRESETS)


def preset(name: str, config: PolicyConfig | None = None) -> PolicyConfig:
    """`config` (default PolicyConfig()) with the preset `name` applied to the fields it leaves
    at their defaults — explicit settings (e.g. `--policy-opt b_max=64`) win over the preset.
    ValueError if the name is unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    config = config or PolicyConfig()
    default = PolicyConfig()
    keep = {k: v for k, v in PRESETS[name].items() if getattr(config, k) == getattr(default, k)}
    return replace(config, **keep)  # type: ignore[arg-type]
