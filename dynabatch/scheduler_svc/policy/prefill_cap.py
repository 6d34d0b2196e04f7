"""The SLA's cap on the prompt tokens of one engine step (dynamic policies, mixed steps).

With decodes riding along prefill chunks (vLLM's chunked prefill; the engine's `--mixed-steps`),
a step takes about a decode step plus the chunk's compute. A long prompt prefilled in one
8192-token step stalls every running decode for that whole step, so a request of a few output
tokens that meets one misses a tight TPOT target however small the batch: live, 8B shape, TPOT
8.7 ms, the only misses of fcfs, dynamic and multibin alike were short outputs beside 4k-token
prompts (bench/results/session14_h100). Algorithm 2 steers the batch size by the measured decode
step; this steers the chunk by the same measurement: the largest chunk that keeps a decode step
plus the chunk's time inside the target,

    tokens = (target * (1 - eps) - decode_step) * prefill_rate

The sum is an upper bound (the chunk's matmuls overlap the weights' read that the decode step
pays), so the cap errs short: a long prompt then takes more steps, each inside the target.
The measured decode step is the worker's step period, which mixed steps lengthen in turn; a cap
lower than the one in force applies at once, a higher one only half way, so the loop settles
instead of swinging between a large and a small chunk.

That rule holds every step inside the target, which the SLA does not ask: TPOT is a request's
mean. A request of 300 tokens can absorb a 200-ms prefill step at 0.7 ms a token, and fcfs's
8192-token steps live on that; only a request with few tokens left cannot. So the cap may grow
past the step rule up to what the decoding requests' own budgets leave (`slack_tokens`): each
one's target x its tokens, less the time it has taken and a decode step per token to come,
spread over the steps until the cap is next refreshed. Simulated (8B, 2-GiB pool, 400-s Azure
segments), it raised dynamic's capacity from 1.4 to 1.8 req/s at TPOT 10 ms and from 2.4 to 3.0
at 11.5 (fcfs: 2.4, 3.2; bench/results/session19_sim).
"""
from __future__ import annotations

# A step always makes some prefill progress. The floor is low because it binds exactly where the
# target is tight: H100, 8B shape, 4-8 decodes at 4k contexts, TPOT 8.7 ms, the formula gives
# 27-48 tokens, and a floor of 64 (sessions 14-16) ran those steps at 8.85-9.8 ms. A mixed step
# costs ~0.2 ms + 27 us per prompt token over a decode step there (64 and 256-token chunks,
# bench/results/session16_h100), so 16 tokens cost ~0.6 ms. Prefill-only steps carry no decode
# and take the engine's whole budget (engine/scheduler.py), so a low cap slows a prompt only
# while other sequences decode.
MIN_TOKENS = 16


def step_prefill_tokens(decode_step_ms: float, prefill_tokens_per_s: float, current: int,
                        tpot_target_s: float, eps: float) -> int:
    """The cap to send (0: nothing measured yet, leave the worker's as it is). `current`: the
    worker's cap in force (0 if unknown; decide() skips a worker reporting none, whose engine
    alternates prefill and decode steps and takes no cap)."""
    if decode_step_ms <= 0 or prefill_tokens_per_s <= 0:
        return 0
    room_s = tpot_target_s * (1.0 - eps) - decode_step_ms / 1000.0
    cap = max(MIN_TOKENS, int(room_s * prefill_tokens_per_s))
    if 0 < current < cap:
        cap = max(MIN_TOKENS, (current + cap) // 2)
    return cap


def slack_tokens(running: list[tuple[float, int, int, float]], now: float, decode_step_ms: float,
                 prefill_tokens_per_s: float, horizon_steps: float) -> int:
    """The largest step prefill the decoding requests' TPOT budgets allow over the next
    `horizon_steps` steps (0: none, or no request decoding). `running`: (TPOT target s,
    tokens generated, tokens predicted in all, first token time, 0 if unknown) of each request
    that has its first token. A request of n tokens may take (n - 1) x target from its first
    token to its last. What it has not spent, less a decode step for each token still to come,
    is slack; spread over the steps it has left in the horizon, it is how much longer than a
    decode step each of them may be. A request past its prediction is taken to end after the
    next token (only its banked slack counts); one with no first-token time is taken to be on
    target so far."""
    if decode_step_ms <= 0 or prefill_tokens_per_s <= 0 or not running:
        return 0
    extra_ms = float("inf")
    for target_s, generated, total, first_s in running:
        n = max(total, generated + 1)
        left = n - generated
        spent_ms = (now - first_s) * 1000.0 if first_s > 0 else (generated - 1) * target_s * 1000.0
        slack_ms = target_s * 1000.0 * (n - 1) - spent_ms - left * decode_step_ms
        extra_ms = min(extra_ms, slack_ms / min(left, max(1.0, horizon_steps)))
    if extra_ms <= 0:
        return 0
    return int(min(extra_ms * prefill_tokens_per_s / 1000.0, 1 << 20))
