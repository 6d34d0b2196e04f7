"""Where a lone prefill step's time goes: torch.profiler over prefill steps of one prompt.

    python tools/profile_prefill.py --model llama-3.2-1b-shape --tokens 64,1024 --out $OUT/pf

For each prompt length: --steps prompts of that length run one at a time (max_tokens 1, so
each is one prefill step and nothing else) under the profiler, after two unprofiled warm-up
steps. Prints the wall time per step, the device time per step, and the top operators by the
host's own time (what bounds a step that the GPU finishes early), then by device time; writes
a Chrome trace per length.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from dynabatch.worker_svc.engine import SequenceRequest, build_engine


def run_prompts(engine, n: int, tokens: int, rng: random.Random, tag: str) -> float:
    """n prompts one after another; returns the mean wall seconds of one."""
    t0 = time.perf_counter()
    for i in range(n):
        engine.add(SequenceRequest(f"{tag}{i}", [rng.randrange(256) for _ in range(tokens)], 1,
                                   ignore_eos=True))
        while engine.has_work():
            engine.step()
    return (time.perf_counter() - t0) / n


def profile_length(engine, tokens: int, steps: int, out: Path | None) -> str:
    rng = random.Random(tokens)
    run_prompts(engine, 2, tokens, rng, f"w{tokens}-")
    cuda = engine.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    wall = run_prompts(engine, steps, tokens, rng, f"u{tokens}-")     # unprofiled wall time
    with profile(activities=acts) as prof:
        run_prompts(engine, steps, tokens, rng, f"p{tokens}-")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out / f"prefill_{tokens}.json"))
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) if cuda else 0.0
    lines = [f"prompt {tokens}: {steps} steps, wall {wall * 1e3:.2f} ms/step, device "
             f"{device_us / steps / 1e3:.2f} ms/step",
             events.table(sort_by="self_cpu_time_total", row_limit=30)]
    if cuda:
        lines.append(events.table(sort_by="self_cuda_time_total", row_limit=15))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-random-llama")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens", default="64,1024")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eager-prefill", action="store_true", help="prefill without torch.compile")
    ap.add_argument("--out", help="folder for the Chrome traces")
    a = ap.parse_args(argv)
    engine = build_engine(a.model, device=a.device, max_running=16, kv_fraction=0.3,
                          compile_prefill=False if a.eager_prefill else None)
    out = Path(a.out) if a.out else None
    for n in (int(t) for t in a.tokens.split(",")):
        print(profile_length(engine, n, a.steps, out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
