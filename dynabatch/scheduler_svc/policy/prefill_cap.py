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
