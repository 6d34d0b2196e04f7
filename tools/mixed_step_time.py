"""Time whole engine steps of the Llama-3.1-8B shape on a GPU: the decode step of k sequences
at a C-token context, and the mixed step of the same k decodes riding along a chunk of a long
prompt (`--mixed-steps`, the step prefill cap set to the chunk), with the prefill kernel's tiles
split into pieces of context (triton_prefill.plan, the default) and left whole. It prices what
the policy's step prefill cap assumes: a mixed step = a decode step + the chunk at the prefill
rate (scheduler_svc/policy/prefill_cap.py).

    python tools/mixed_step_time.py --json $OUT/mixed_step_time.json
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from dynabatch.worker_svc.engine import SequenceRequest, build_engine

PROMPT = 8000          # the long prompt whose chunks the decodes ride along


def _period(engine, kind: str, steps: int) -> float:
    """Mean ms per step over `steps` steps of `kind` (the engine's steps overlap, so this is
    the step period)."""
    times = []
    while len(times) < steps:
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if engine.last_step is not None and engine.last_step.kind == kind:
            times.append(dt)
    return 1e3 * sum(times[2:]) / len(times[2:])


def case(engine, k: int, context: int, chunk: int, split: bool, rng: random.Random) -> dict:
    graphs = engine.runner.prefill_graphs
    target = graphs.split_target
    if not split:
        graphs.split_target = 0                     # plan then leaves every tile whole
    vocab = engine.model.config.vocab_size
    reqs = [SequenceRequest(f"d{i}", [rng.randrange(vocab) for _ in range(context)],
                            10_000, ignore_eos=True) for i in range(k)]
    engine.set_step_prefill_tokens(0)
    for r in reqs:
        engine.add(r)
    while len(engine.scheduler.running) < k or any(
            s.num_computed < s.num_prompt for s in engine.scheduler.running):
        engine.step()
    decode_ms = _period(engine, "decode", 12)
    engine.set_step_prefill_tokens(chunk)
    engine.add(SequenceRequest("long", [rng.randrange(vocab) for _ in range(PROMPT)], 1,
                               ignore_eos=True))
    mixed_ms = _period(engine, "prefill", 12)
    for request_id in [r.request_id for r in reqs] + ["long"]:
        engine.abort(request_id)
    while engine.has_work():
        engine.step()
    graphs.split_target = target
    return {"decodes": k, "context": context, "chunk": chunk, "split": split,
            "decode_ms": round(decode_ms, 3), "mixed_ms": round(mixed_ms, 3)}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b-shape")
    p.add_argument("--kv-blocks", type=int, default=4096)
    p.add_argument("--contexts", type=_ints, default="512,4096", help="context tokens (a,b,...)")
    p.add_argument("--decodes", type=_ints, default="4,8", help="decoding sequences (a,b,...)")
    p.add_argument("--chunks", type=_ints, default="64,256", help="chunk tokens (a,b,...)")
    p.add_argument("--split-only", action="store_true", help="skip the unsplit kernel's runs")
    p.add_argument("--json")
    a = p.parse_args()
    engine = build_engine(a.model, device="cuda", num_kv_blocks=a.kv_blocks, max_running=64,
                          prefill_token_budget=2048, mixed_steps=True)
    rng = random.Random(0)
    rows = []
    print(f"{'decodes':>7} {'context':>7} {'chunk':>5} {'split':>5} {'decode ms':>9} "
          f"{'mixed ms':>8} {'extra ms':>8}")
    for context in a.contexts:
        for k in a.decodes:
            for chunk in a.chunks:
                for split in (True,) if a.split_only else (True, False):
                    r = case(engine, k, context, chunk, split, rng)
                    rows.append(r)
                    print(f"{k:>7} {context:>7} {chunk:>5} {split!s:>5} {r['decode_ms']:>9.3f} "
                          f"{r['mixed_ms']:>8.3f} {r['mixed_ms'] - r['decode_ms']:>8.3f}")
    out = {"gpu": torch.cuda.get_device_name(0), "model": a.model,
           "prefill_tokens_per_s": round(engine.stats().prefill_tokens_per_s), "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
