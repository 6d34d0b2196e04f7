"""Where a decode step's time goes: torch.profiler over steady-state decode steps of the engine.

    python tools/profile_decode.py --model llama-3.2-1b-shape --batches 1,64 --out $OUT/profile

For each batch size: B requests (prompt --prompt tokens) are prefilled, a few decode steps warm
up, then --steps decode steps run under the profiler. Prints the top kernels by device time
(CUDA) or the top operators by CPU time (CPU), and writes a Chrome trace per batch size
(open it in chrome://tracing or Perfetto). With CUDA graphs on (the default, as served), the
kernels inside each graph replay are attributed by CUPTI; --no-graphs profiles the same layers
launched one by one, which also shows the launch gaps graphs remove.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dynabatch.worker_svc.engine import SequenceRequest, build_engine


def decode_steps(engine, n: int) -> int:
    """Run up to n steps; returns how many were decode steps."""
    done = 0
    for _ in range(n):
        engine.step()
        if engine.last_step is not None and engine.last_step.kind == "decode":
            done += 1
    return done


def profile_batch(engine, batch: int, prompt: int, steps: int, out: Path | None) -> str:
    rng = random.Random(batch)
    for i in range(batch):
        engine.add(SequenceRequest(f"p{batch}-{i}", [rng.randrange(256) for _ in range(prompt)],
                                   steps + 64, ignore_eos=True))
    while engine.last_step is None or engine.last_step.kind != "decode":   # prefill all
        engine.step()
    decode_steps(engine, 8)                                                 # warm up
    cuda = engine.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        ran = decode_steps(engine, steps)
        if cuda:
            torch.cuda.synchronize()
    for rid in [f"p{batch}-{i}" for i in range(batch)]:
        engine.abort(rid)
    trace = (out or Path("/tmp")) / f"decode_b{batch}.json"
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    return f"batch {batch}: {ran} decode steps profiled\n{kernel_summary(trace, ran)}\n{table}"


def kernel_summary(trace: Path, steps: int) -> str:
    """Per step: kernels launched, their summed time, and the idle gaps between consecutive
    kernels (the launch and ramp cost a fused kernel removes)."""
    events = json.loads(trace.read_text()).get("traceEvents", [])
    kernels = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "kernel")
    if not kernels or not steps:
        return "no kernels traced"
    busy = sum(d for _, d in kernels)
    gaps = [b[0] - (a[0] + a[1]) for a, b in zip(kernels, kernels[1:])]
    inner = [g for g in gaps if 0 <= g < 50]         # gaps inside a step (not between steps)
    return (f"per step: {len(kernels) / steps:.0f} kernels, {busy / steps:.1f} us busy, "
            f"{sum(inner) / steps:.1f} us in {len(inner) / steps:.0f} gaps < 50 us "
            f"(median gap {sorted(inner)[len(inner) // 2] if inner else 0:.2f} us)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-random-llama")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs")
    ap.add_argument("--out", help="folder for the Chrome traces")
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    engine = build_engine(a.model, device=a.device, max_running=max(batches),
                          cuda_graphs=not a.no_graphs, kv_fraction=0.5)
    out = Path(a.out) if a.out else None
    for b in batches:
        print(profile_batch(engine, b, a.prompt, a.steps, out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
