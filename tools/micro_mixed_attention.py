"""Time the attention of a mixed step (decode rows riding along a prefill chunk) on a GPU: the
Triton prefill kernel with k one-query rows at context C beside a 64-token chunk, per layer,
replayed in a CUDA graph, with each tile whole (one program walks its context) and with the
longer tiles split into pieces of context (triton_prefill.plan), as the prefill graphs run it.
Llama-3.1-8B's attention shape (32 heads, 8 KV heads, head_dim 128, 16-token blocks, bf16).
Why: live, a mixed step with a 64-token chunk took 9-12 ms with 4-6 sequences at 4k-token
contexts (bench/results/session15_h100).

    python tools/micro_mixed_attention.py --json $OUT/micro_mixed_attention.json
"""
from __future__ import annotations

import argparse
import json

import torch

from dynabatch.worker_svc.engine import triton_prefill as tp
from dynabatch.worker_svc.engine.triton_decode import sm_count
from micro_decode_ops import graph_us   # tools/ is on the path when run as a script

HEADS, KV_HEADS, DIM, BLOCK, LAYERS = 32, 8, 128, 16, 32
CHUNK = 64


def case(rows: int, context: int, split: bool) -> float:
    """Per-layer µs of one launch: `rows` one-query rows and a CHUNK-query chunk, all at
    `context` tokens of cached context; `split`: tiles cut into pieces as plan would."""
    q_lens = [1] * rows + [CHUNK]
    n_seqs = len(q_lens)
    per_seq = -(-context // BLOCK)
    kv = torch.randn(2, n_seqs * per_seq + 1, KV_HEADS, BLOCK, DIM, device="cuda",
                     dtype=torch.bfloat16)
    table = torch.arange(1, n_seqs * per_seq + 1, dtype=torch.int32,
                         device="cuda").view(n_seqs, per_seq)
    total = sum(q_lens)
    q = torch.randn(total, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    starts = torch.tensor([0, *q_lens]).cumsum(0)[:-1]
    seqs = torch.stack([starts, torch.tensor(q_lens), torch.full((n_seqs,), context),
                        torch.arange(n_seqs)]).to("cuda")
    target = tp.split_target(KV_HEADS, sm_count(torch.device("cuda")))
    slots = 2 * target if split else 0
    items, merges = (torch.from_numpy(a).to("cuda") for a in tp.plan(
        q_lens, [context] * n_seqs, tp.max_tiles(total, n_seqs) + slots, slots, target))
    scratch = tp.Scratch.make(slots, HEADS, KV_HEADS, DIM, torch.device("cuda"))
    return graph_us(lambda: tp.paged_prefill(q, kv[0], kv[1], items, merges, seqs, table,
                                             DIM ** -0.5, scratch), reps=20, inner=8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    a = p.parse_args()
    rows = []
    print(f"{'decode rows':>11} {'context':>7} {'whole us/layer':>14} {'split us/layer':>14} "
          f"{'whole ms/step':>13} {'split ms/step':>13}")
    for context in (512, 4096, 8192):
        for k in (0, 4, 8, 32):
            whole, split = case(k, context, False), case(k, context, True)
            rows.append({"decode_rows": k, "context": context,
                         "whole_us_per_layer": round(whole, 1),
                         "split_us_per_layer": round(split, 1),
                         "whole_ms_per_step": round(whole * LAYERS / 1000, 3),
                         "split_ms_per_step": round(split * LAYERS / 1000, 3)})
            print(f"{k:>11} {context:>7} {whole:>14.1f} {split:>14.1f} "
                  f"{whole * LAYERS / 1000:>13.3f} {split * LAYERS / 1000:>13.3f}")
    out = {"gpu": torch.cuda.get_device_name(0), "shape": "llama-3.1-8b attention",
           "chunk_tokens": CHUNK, "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
