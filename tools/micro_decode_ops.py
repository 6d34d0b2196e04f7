"""Time the decode step's pieces one by one on a GPU, each replayed in a CUDA graph (no launch
overhead), against alternatives: where the 1B decode step's time over its roofline goes.

    python tools/micro_decode_ops.py --json $OUT/micro_decode_ops.json

- GEMMs of the 1B shape (fused q/k/v, o, fused gate/up, down, lm_head) at batch 1 / 64 / 256:
  cuBLAS as chosen by default, and after PyTorch's TunableOp has tried the other cuBLASLt
  algorithms for the shape; GB/s = weight bytes / time.
- The MLP activation silu(gate) * up: inductor (dynamic shapes, as the compiled layer), eager.
- Greedy argmax over the 128k vocabulary: argmax_rows (two stages) and torch.argmax.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from dynabatch.worker_svc.engine.sampler import argmax_rows

HIDDEN, INTER, VOCAB, QKV = 2048, 8192, 128256, 3072
GEMMS = {"qkv": (HIDDEN, QKV), "o": (HIDDEN, HIDDEN), "gate_up": (HIDDEN, 2 * INTER),
         "down": (INTER, HIDDEN), "lm_head": (HIDDEN, VOCAB)}


def graph_us(fn, reps: int = 50, inner: int = 16) -> float:
    """Microseconds per call of fn(), from a graph holding `inner` calls."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) * 1000 / (reps * inner), 2)


def gemms(batches: list[int]) -> list[dict]:
    rows = []
    for name, (k, n) in GEMMS.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for b in batches:
            x = torch.randn(b, k, device="cuda", dtype=torch.bfloat16)
            us = graph_us(lambda: F.linear(x, w))
            rows.append(dict(gemm=name, batch=b, us=us, gb_s=round(w.numel() * 2 / us / 1e3)))
    return rows


def tuned_gemms(batches: list[int]) -> list[dict]:
    tunable = torch.cuda.tunable
    tunable.enable(True)
    tunable.tuning_enable(True)
    tunable.set_max_tuning_duration(50)
    try:
        rows = gemms(batches)
    finally:
        tunable.tuning_enable(False)
    rows = gemms(batches)              # timed with the tuned choices, no tuning inside graphs
    tunable.enable(False)
    return rows


def silu_mul(batches: list[int]) -> list[dict]:
    def act(gu: torch.Tensor) -> torch.Tensor:
        gate, up = gu.split(INTER, dim=-1)
        return F.silu(gate) * up
    compiled = torch.compile(act, dynamic=True)
    from torch._inductor.utils import run_and_get_code
    _, code = run_and_get_code(compiled, torch.randn(1, 64, 2 * INTER, device="cuda",
                                                     dtype=torch.bfloat16))
    rows: list = [dict(op="silu_mul inductor code", code=code)]
    for b in batches:
        gu = torch.randn(1, b, 2 * INTER, device="cuda", dtype=torch.bfloat16)
        rows.append(dict(op="silu_mul", batch=b, compiled_us=graph_us(lambda: compiled(gu)),
                         eager_us=graph_us(lambda: act(gu))))
    return rows


def argmax(batches: list[int]) -> list[dict]:
    rows = []
    for b in batches:
        x = torch.randn(b, VOCAB, device="cuda", dtype=torch.bfloat16)
        rows.append(dict(op="argmax", batch=b, argmax_rows_us=graph_us(lambda: argmax_rows(x)),
                         torch_argmax_us=graph_us(lambda: x.argmax(-1))))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    os.environ.setdefault("PYTORCH_TUNABLEOP_VERBOSE", "0")
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    for name, fn in (("gemm_default", gemms), ("silu_mul", silu_mul), ("argmax", argmax),
                     ("gemm_tunableop", tuned_gemms)):
        try:
            out[name] = fn(batches)
        except Exception as exc:               # report and go on: one part failing is a result
            out[name] = f"{type(exc).__name__}: {exc}"
        print(name)
        for row in out[name] if isinstance(out[name], list) else [out[name]]:
            print("  ", row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
