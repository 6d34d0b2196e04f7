"""Time the Triton decode GEMM (engine/triton_gemv.py) against F.linear (cuBLAS) on a GPU, each
replayed in a CUDA graph of 16 calls (8: lm_head), at the Llama-3.2-1B shapes (the lm_head,
2048 x 128256, among them) and batch 1..16; then sweep launch configurations per shape so the
table in triton_gemv.py can be picked from one run (`--shapes lm_head --sweep-m 1,2`: that one).

    python tools/micro_gemv.py --json $OUT/micro_gemv.json

- Main table: for each shape (qkv, o, gate_up, down, lm_head) and batch M: us per call and
  weight GB/s for F.linear and gemv (pick_config's choice). "cold": the calls in the graph each
  read a different copy of the weight (16 copies > the 50-MB L2, as a model's layers; 8 of the
  525-MB lm_head); "hot": all 16 read one copy (L2-resident for qkv and o; as
  tools/micro_decode_ops.py measures). rel_err: max |gemv - F.linear| / max |F.linear|;
  err32_*: the same against an fp32 F.linear.
- Sweep (cold, at --sweep-m, 1 first): tiles, warps, stages, split-K and fma vs dot around the
  current choice; stops starting new configurations once --budget-s seconds have passed
  (Triton compiles each one, ~0.3-1 s). Ends with the fastest correct config per (padded M,
  K, N) as lines to paste into triton_gemv._TABLE.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton

from dynabatch.worker_svc.engine.triton_gemv import (Config, default_config, gemv, padded_rows,
                                                     pick_config)

SHAPES = {"qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 16384),
          "down": (8192, 2048), "lm_head": (2048, 128256)}
DEVICE = "cuda"
COPIES = 16          # weight copies per cold graph: one per call (fewer for big weights)
COPY_BYTES = 4 << 30  # at most this much in copies (but 2 or more)
OK_ERR = 2e-2        # rel_err above this marks a config wrong (bf16 rounding is < 1e-2)


def graph_us(fns: list, reps: int = 20, trials: int = 3) -> float:
    """Microseconds per call, from a CUDA graph holding one call of each fn (in order); the
    best of `trials` timings of `reps` replays. Each fn runs once first (compiles Triton)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(trials):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / (reps * len(fns)))
    return round(best, 2)


def gb_s(k: int, n: int, us: float) -> int:
    return round(n * k * 2 / us / 1e3)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def weights(k: int, n: int) -> list[torch.Tensor]:
    """COPIES copies, fewer (>= 2) where they would pass COPY_BYTES (the lm_head: 8)."""
    copies = max(2, min(COPIES, COPY_BYTES // (2 * n * k)))
    return [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * k ** -0.5
            for _ in range(copies)]


def main_rows(shapes: dict, batches: list[int]) -> list[dict]:
    rows = []
    for name, (k, n) in shapes.items():
        ws = weights(k, n)
        for m in batches:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            cfg = pick_config(m, k, n, _sms())
            ref, ref32 = F.linear(x, ws[0]), F.linear(x.float(), ws[0].float())
            got = gemv(x, ws[0])
            lin_cold = graph_us([lambda w=w: F.linear(x, w) for w in ws])
            tri_cold = graph_us([lambda w=w: gemv(x, w) for w in ws])
            lin_hot = graph_us([lambda: F.linear(x, ws[0])] * COPIES)
            tri_hot = graph_us([lambda: gemv(x, ws[0])] * COPIES)
            rows.append(dict(
                shape=name, m=m, k=k, n=n, config=repr(cfg),
                linear_us=lin_cold, gemv_us=tri_cold, linear_gb_s=gb_s(k, n, lin_cold),
                gemv_gb_s=gb_s(k, n, tri_cold), speedup=round(lin_cold / tri_cold, 2),
                linear_hot_us=lin_hot, gemv_hot_us=tri_hot, rel_err=rel_err(got, ref),
                err32_linear=rel_err(ref, ref32), err32_gemv=rel_err(got, ref32)))
            print_row(rows[-1])
        del ws
    return rows


def print_row(r: dict) -> None:
    print(f"{r['shape']:>8} M={r['m']:<2} linear {r['linear_us']:6.2f} us {r['linear_gb_s']:5d}"
          f" GB/s | gemv {r['gemv_us']:6.2f} us {r['gemv_gb_s']:5d} GB/s  x{r['speedup']:<5}"
          f"| hot {r['linear_hot_us']:6.2f} / {r['gemv_hot_us']:6.2f} us | rel_err "
          f"{r['rel_err']:.1e} | {r['config']}", flush=True)


def candidates(m: int, k: int, n: int, sms: int) -> list[Config]:
    """The current choice first; fma tile grids at two register footprints (and a bigger one
    at 8 warps); the current tiles with other stages, 8 warps, other splits; dot tiles."""
    cur = pick_config(m, k, n, sms)
    k_pow2 = triton.next_power_of_2(k)
    m_pad = padded_rows(m)
    out = [cur, default_config(m, k, n, sms)]
    if m <= 4:
        for bn in (2, 4, 8, 16, 32):
            for elems, warps in ((4096, 4), (8192, 4), (16384, 8)):
                bk = elems // (m_pad * bn)
                if (warps == 4 or bn == cur.block_n) and 128 <= bk <= k_pow2 \
                        and triton.cdiv(n, bn) >= sms:
                    out.append(Config(bn, bk, warps, min(2, triton.cdiv(k, bk))))
    iters = triton.cdiv(k, cur.block_k * cur.split)
    out += [replace(cur, num_stages=st) for st in (1, 2, 3) if st <= iters]
    out.append(replace(cur, num_warps=8))
    out += [replace(cur, split=sp) for sp in ((1, 2, 4) if cur.dot else (2,))]
    for bn, bk in ((16, 256), (32, 256)) if m <= 4 else ((16, 128), (16, 512), (32, 256),
                                                          (64, 128)):
        out.append(Config(bn, bk, 4, 3, _auto_split(k, n, bn, bk, sms), dot=True))
    seen, unique = set(), []
    for cfg in out:
        if cfg not in seen and (cfg.dot or m <= 4) and cfg.block_k <= k_pow2:
            seen.add(cfg)
            unique.append(cfg)
    return unique


def _auto_split(k: int, n: int, bn: int, bk: int, sms: int) -> int:
    """default_config's rule: about 2 programs per SM, at most 4 splits, >= 2 tiles each."""
    want = max(1, min(4, -(-2 * sms // triton.cdiv(n, bn)), k // (2 * bk)))
    return 1 << (want.bit_length() - 1)


def sweep(shapes: dict, ms: list[int], deadline: float) -> tuple[list[dict], int]:
    rows, skipped = [], 0
    for m in ms:
        for name, (k, n) in shapes.items():
            ws = weights(k, n)
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            ref = F.linear(x, ws[0])
            lin = graph_us([lambda w=w: F.linear(x, w) for w in ws])
            for cfg in candidates(m, k, n, _sms()):
                if time.monotonic() > deadline:
                    skipped += 1
                    continue
                row = dict(shape=name, m=m, k=k, n=n, config=repr(cfg), linear_us=lin)
                try:
                    err = rel_err(gemv(x, ws[0], config=cfg), ref)
                    us = graph_us([lambda w=w: gemv(x, w, config=cfg) for w in ws])
                    row.update(us=us, gb_s=gb_s(k, n, us), rel_err=err, ok=err <= OK_ERR)
                except Exception as exc:           # e.g. out of shared memory: a result too
                    row.update(error=f"{type(exc).__name__}: {str(exc)[:200]}", ok=False)
                rows.append(row)
                print(f"  sweep {name:>8} M={m:<2} " + (
                    f"{row['us']:6.2f} us {row['gb_s']:5d} GB/s (linear {lin:6.2f}) "
                    f"err {row['rel_err']:.1e}" if "us" in row else row["error"][:60])
                    + f" | {row['config']}", flush=True)
            del ws
    return rows, skipped


def best_table(rows: list[dict]) -> dict[str, str]:
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (padded_rows(r["m"]), r["k"], r["n"])
        if r.get("ok") and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    return {str(key): f"{r['config']}  # {r['us']} us, {r['gb_s']} GB/s, linear "
                      f"{r['linear_us']} us" for key, r in sorted(best.items())}


_SMS: list[int] = []


def _sms() -> int:
    if not _SMS:
        _SMS.append(torch.cuda.get_device_properties(0).multi_processor_count)
    return _SMS[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--sweep-m", default="1,16", help="batches to sweep configs at ('' none)")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--budget-s", type=float, default=80.0,
                   help="start no sweep config after this many seconds from the start")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    t0 = time.monotonic()
    shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
    out = dict(device=torch.cuda.get_device_name(), sms=_sms(), torch=torch.__version__,
               triton=triton.__version__, copies=COPIES)
    print(f"{out['device']} ({out['sms']} SMs), torch {out['torch']}, triton {out['triton']}")
    out["rows"] = main_rows(shapes, [int(b) for b in args.batches.split(",")])
    ms = [int(m) for m in args.sweep_m.split(",") if m]
    out["sweep"], out["sweep_skipped"] = sweep(shapes, ms, t0 + args.budget_s)
    out["best_table"] = best_table(out["sweep"])
    out["wall_s"] = round(time.monotonic() - t0, 1)
    print(f"sweep: {len(out['sweep'])} configs timed, {out['sweep_skipped']} skipped (budget)")
    print("best per (padded M, K, N), for triton_gemv._TABLE:")
    for key, line in out["best_table"].items():
        print(f"    {key}: {line},")
    print(f"wall {out['wall_s']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
