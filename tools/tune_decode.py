"""Sweep the Triton paged-decode kernel's settings (splits, tile, warps, stages) on a GPU.

    python tools/tune_decode.py --batches 1,16,64,256 --json $OUT/tune_decode.json

The 1B shape's attention (32 query heads, 8 KV heads, head_dim 64, 16-token blocks, bf16), each
sequence's context drawn from [--ctx-lo, --ctx-hi] (the engine bench decodes at 256..512), its
blocks shuffled over the pool. Each setting runs --layers calls (one per layer cache, as a
decode step does) inside one CUDA graph, replayed --reps times: the time per call excludes
launch overhead, as in the engine. Prints, per batch, the default setting and the fastest ones,
with the K/V bytes read per call over the time (GB/s).
"""
from __future__ import annotations

import argparse
import itertools
import json
import random

import torch

from dynabatch.worker_svc.engine.triton_decode import (Launch, sm_count, default_launch,
                                                       num_splits, paged_decode)

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 64, 16


def make_case(batch: int, ctx_lo: int, ctx_hi: int, layers: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    ctx = [rng.randint(ctx_lo, ctx_hi) for _ in range(batch)]
    width = -(-ctx_hi // BLOCK) + 4
    num_blocks = sum(-(-c // BLOCK) for c in ctx) + 1
    perm = list(range(1, num_blocks))
    rng.shuffle(perm)
    table = torch.zeros(batch, width, dtype=torch.int32)
    for i, c in enumerate(ctx):
        for j in range(-(-c // BLOCK)):
            table[i, j] = perm.pop()
    dev, dt = "cuda", torch.bfloat16
    caches = [torch.randn(2, num_blocks, KV_HEADS, BLOCK, DIM, device=dev, dtype=dt)
              for _ in range(layers)]
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=dev)
    table = table.to(dev)
    pos = ctx_t.long() - 1
    return dict(caches=caches, table=table, ctx=ctx_t, ctx_host=ctx,
                wb=table.gather(1, (pos // BLOCK)[:, None]).squeeze(1), wo=pos % BLOCK,
                q=torch.randn(batch, HEADS, DIM, device=dev, dtype=dt),
                kn=torch.randn(batch, KV_HEADS, DIM, device=dev, dtype=dt),
                vn=torch.randn(batch, KV_HEADS, DIM, device=dev, dtype=dt))


def time_setting(case: dict, splits: int, launch: Launch, reps: int) -> float:
    """Microseconds per call, from a graph of one call per layer cache."""
    def calls() -> None:
        for kv in case["caches"]:
            paged_decode(case["q"], case["kn"], case["vn"], kv[0], kv[1], case["wb"], case["wo"],
                         case["table"], case["ctx"], DIM ** -0.5, splits=splits, launch=launch)
    calls()                                          # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (reps * len(case["caches"]))


def sweep(batch: int, args: argparse.Namespace) -> dict:
    case = make_case(batch, args.ctx_lo, args.ctx_hi, args.layers)
    kv_bytes = 2 * sum(case["ctx_host"]) * KV_HEADS * DIM * 2
    width = case["table"].shape[1] * BLOCK
    chosen = num_splits(batch, KV_HEADS, width, sm_count(case["q"].device))
    rows = []
    split_options = sorted({1, 2, 4, chosen, max(1, chosen // 2), min(2 * chosen, 32)})
    for splits, block_n, warps, stages in itertools.product(
            split_options, (32, 64, 128), (2, 4, 8), (1, 2, 3)):
        launch = Launch(block_n, warps, stages)
        try:
            us = time_setting(case, splits, launch, args.reps)
        except Exception as exc:                     # e.g. out of shared memory
            print(f"  skip splits={splits} {launch}: {type(exc).__name__}")
            continue
        rows.append(dict(splits=splits, block_n=block_n, num_warps=warps, num_stages=stages,
                         us=round(us, 2), gb_s=round(kv_bytes / us / 1e3, 1)))
    default = dict(splits=chosen, **default_launch(chosen, DIM, BLOCK).__dict__)
    base = next((r for r in rows if all(r[k] == v for k, v in default.items())), None)
    rows.sort(key=lambda r: r["us"])
    print(f"batch {batch}: mean ctx {sum(case['ctx_host']) / batch:.0f}, "
          f"K/V {kv_bytes / 1e6:.1f} MB per call; default {default}: "
          f"{base['us'] if base else '?'} us")
    for r in rows[:6]:
        print(f"  {r}")
    return dict(batch=batch, kv_bytes=kv_bytes, default=default, default_us=base and base["us"],
                best=rows[:10])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--ctx-lo", type=int, default=256)
    p.add_argument("--ctx-hi", type=int, default=512)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    results = [sweep(int(b), args) for b in args.batches.split(",")]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), args=vars(args),
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
