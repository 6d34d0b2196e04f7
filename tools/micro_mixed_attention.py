"""Time the attention of a mixed step (decode rows riding along a prefill chunk) on a GPU: the
Triton prefill kernel with k one-query rows at context C beside a 64-token chunk, per layer,
replayed in a CUDA graph. Llama-3.1-8B's attention shape (32 heads, 8 KV heads, head_dim 128,
16-token blocks, bf16). Why: live, a mixed step with a 64-token chunk took 9-12 ms with 4-6
sequences at 4k-token contexts (bench/results/session15_h100).

    python tools/micro_mixed_attention.py --json $OUT/micro_mixed_attention.json
"""
from __future__ import annotations

import argparse
import json

import torch

from dynabatch.worker_svc.engine import triton_prefill as tp
from micro_decode_ops import graph_us   # tools/ is on the path when run as a script

HEADS, KV_HEADS, DIM, BLOCK, LAYERS = 32, 8, 128, 16, 32
CHUNK = 64


def case(rows: int, context: int) -> float:
    """Per-layer µs of one launch: `rows` one-query rows and a CHUNK-query chunk, all at
    `context` tokens of cached context."""
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
    tiles = torch.from_numpy(tp.plan_tiles(q_lens, tp.max_tiles(total, n_seqs))).to("cuda")
    return graph_us(lambda: tp.paged_prefill(q, kv[0], kv[1], tiles, seqs, table, DIM ** -0.5),
                    reps=20, inner=8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    a = p.parse_args()
    rows = []
    print(f"{'decode rows':>11} {'context':>7} {'us/layer':>9} {'ms/step (32 layers)':>20}")
    for context in (512, 4096):
        for k in (0, 2, 4, 6, 8):
            us = case(k, context)
            rows.append({"decode_rows": k, "context": context, "us_per_layer": round(us, 1),
                         "ms_per_step": round(us * LAYERS / 1000, 3)})
            print(f"{k:>11} {context:>7} {us:>9.1f} {us * LAYERS / 1000:>20.3f}")
    out = {"gpu": torch.cuda.get_device_name(0), "shape": "llama-3.1-8b attention",
           "chunk_tokens": CHUNK, "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
