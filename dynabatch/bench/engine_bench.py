"""`dynabatch bench engine`: offline engine throughput against the HBM roofline and HF generate.

Runs, in one process: start-up (load + KV pool + graph capture); offline batches of equal
requests (all added at once, greedy, EOS ignored); a mixed-length run; lone prompts for the
prefill-time curve; then HF `generate` with a static cache (torch.compile'd by transformers on
CUDA) at some batch sizes as the baseline. Every figure is wall-clock of real steps.

Roofline: a decode step must read every weight once plus the live KV of every sequence; its
floor is those bytes over the HBM bandwidth measured in the same run (a device-to-device copy,
bytes read + written over time). The JSON carries per-step decode samples (batch, context,
ms) and lone-prefill samples (tokens, ms), the schema bench/latency_model.py fits.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = "on CUDA / on CPU"
    p.add_argument("--model", default=None, help="default llama-3.2-1b-shape / tiny-random-llama")
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", default=None,
                   help=f"comma list; default 1,16,64,256 / 1,4,16 ({g})")
    p.add_argument("--prompt-len", type=int, default=None, help="default 256 / 32")
    p.add_argument("--output-len", type=int, default=None, help="default 256 / 32")
    p.add_argument("--mixed-requests", type=int, default=None,
                   help="mixed run: prompts uniform in [32, 512] (CPU: [8, 64]); default 512 / 32")
    p.add_argument("--mixed-output", type=int, default=None, help="default 128 / 16")
    p.add_argument("--baseline-batches", default=None,
                   help="HF generate batches; default 1,64,256 / 1,4; 'none' to skip")
    p.add_argument("--eager-decode", action="store_true",
                   help="decode layers without torch.compile (default compiles them on CUDA)")
    p.add_argument("--eager-prefill", action="store_true",
                   help="prefill without torch.compile (default compiles its pieces on CUDA)")
    p.add_argument("--no-prefill-graphs", action="store_true",
                   help="run prefill steps unpadded (default replays graphs at bucketed token "
                        "counts on CUDA)")
    p.add_argument("--gemv-rows", type=int, default=None,
                   choices=range(5), metavar="0..4",
                   help="decode steps of at most this many rows run the lean decode (Triton "
                        "GEMV with fused norms; default 2 on CUDA, 0 = off elsewhere)")
    p.add_argument("--no-gemv", dest="gemv_rows", action="store_const", const=0,
                   help="decode every step through the compiled HF layers and cuBLAS (same as "
                        "--gemv-rows 0)")
    p.add_argument("--kv-fraction", type=float, default=0.5,
                   help="share of free memory for the KV pool (leaves room for the baseline)")
    p.add_argument("--prefill-budget", type=int, default=8192)
    p.add_argument("--json", default=None, help="write results here")


def _csv(text: str | None, default: list[int]) -> list[int]:
    if text is None:
        return default
    return [] if text == "none" else [int(x) for x in text.split(",") if x]


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def measure_hbm_bandwidth(device: torch.device) -> float | None:
    """Bytes/s of a 4 GiB device-to-device copy (read + write), best of 10."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 31, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 32) / best


def drive(engine, requests: list) -> tuple[float, list, int]:
    """Add all requests, step to completion; (seconds, step records, output tokens)."""
    records, n_out = [], 0
    _sync()
    t0 = time.perf_counter()
    for r in requests:
        engine.add(r)
    while engine.has_work():
        for o in engine.step():
            n_out += len(o.token_ids)
        if engine.last_step is not None:
            records.append(engine.last_step)
            engine.last_step = None
    return time.perf_counter() - t0, records, n_out


def _requests(n: int, prompt_lens: list[int], out: int, rng: random.Random, tag: str) -> list:
    from dynabatch.worker_svc.engine import SequenceRequest
    return [SequenceRequest(f"{tag}{i}", [rng.randrange(256) for _ in range(prompt_lens[i])],
                            out, ignore_eos=True) for i in range(n)]


class Roofline:
    def __init__(self, engine, bandwidth: float | None) -> None:
        from dynabatch.worker_svc.engine.kv_cache import kv_bytes_per_block
        net = engine.model
        self.param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
        self.kv_per_token = kv_bytes_per_block(net.config, engine.kv.block_size,
                                               engine.kv.data.dtype) / engine.kv.block_size
        self.bandwidth = bandwidth

    def step_bytes(self, context_tokens: int) -> float:
        return self.param_bytes + self.kv_per_token * context_tokens

    def summary(self, decode: list) -> dict:
        ms = sum(r.seconds for r in decode) / len(decode) * 1e3
        gbs = sum(self.step_bytes(r.context_tokens) for r in decode) / sum(
            r.seconds for r in decode)
        out = {"ms_per_step": round(ms, 4), "achieved_GBps": round(gbs / 1e9, 1)}
        if self.bandwidth:
            out["pct_roofline"] = round(100 * gbs / self.bandwidth, 1)
            floor = sum(self.step_bytes(r.context_tokens) for r in decode) / len(decode)
            out["roofline_ms"] = round(floor / self.bandwidth * 1e3, 4)
        return out


def offline(engine, roof: Roofline, batch: int, prompt: int, out: int, rng) -> dict:
    secs, recs, n_out = drive(engine, _requests(batch, [prompt] * batch, out, rng, f"b{batch}-"))
    full = [r for r in recs if r.kind == "decode" and r.tokens == batch]
    res = {"batch": batch, "tok_s": round(n_out / secs, 1), "seconds": round(secs, 3),
           "decode_tok_s": round(batch * len(full) / sum(r.seconds for r in full), 1),
           "prefill_s": round(sum(r.seconds for r in recs if r.kind == "prefill"), 4),
           **roof.summary(full)}
    graphs = engine.runner.graphs
    if graphs is not None:   # the device part alone: replays of the bucket's graph
        res["graph_replay_ms"] = round(replay_ms(graphs, batch), 4)
    samples = [{"batch": r.tokens, "context_tokens": r.context_tokens,
                "ms": round(r.seconds * 1e3, 4)} for r in recs if r.kind == "decode"]
    return res, samples[:: max(1, len(samples) // 24)]


def replay_ms(graphs, batch: int) -> float:
    """Mean time of 20 back-to-back replays of the decode graph serving `batch` (CUDA events).

    Replays the last staged inputs; their sequences have finished, so the K/V writes land in
    free blocks."""
    graph = graphs._graphs[next(b for b in graphs.buckets if b >= batch)][0]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 20


def lone_prefills(engine, lengths: list[int], rng) -> list[dict]:
    """One prompt alone per step (max_tokens 1 so no decode follows): time vs prompt length."""
    points = []
    for n in lengths:
        best = float("inf")
        for rep in range(3):
            _, recs, _ = drive(engine, _requests(1, [n], 1, rng, f"pf{n}-{rep}-"))
            best = min(best, sum(r.seconds for r in recs if r.kind == "prefill"))
        points.append({"tokens": n, "ms": round(best * 1e3, 4)})
    return points


def hf_baseline(model: str, device: torch.device, dtype, batches: list[int], prompt: int,
                out: int) -> dict:
    """HF generate, static cache (transformers compiles the forward on CUDA), greedy, no EOS."""
    from transformers import AutoModelForCausalLM
    from dynabatch.wire import models
    torch.manual_seed(0)
    with torch.device(device):
        net = AutoModelForCausalLM.from_config(models.load_config(model), dtype=dtype,
                                               attn_implementation="sdpa").eval()
    net.generation_config.eos_token_id = None
    res = {}
    for b in batches:
        ids = torch.randint(0, 256, (b, prompt), device=device)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=out, do_sample=False,
                  cache_implementation="static", pad_token_id=0)
        times = []
        for _ in range(2):       # first call compiles; the second is timed
            _sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                got = net.generate(ids, **kw)
            _sync()
            times.append(time.perf_counter() - t0)
        assert got.shape[1] == prompt + out
        res[str(b)] = {"tok_s": round(b * out / times[1], 1),
                       "ms_per_step": round(times[1] / out * 1e3, 3),
                       "first_call_s": round(times[0], 2)}
        print(f"  HF static generate  batch {b:4d}: {res[str(b)]['tok_s']:>10.1f} tok/s "
              f"{res[str(b)]['ms_per_step']:8.3f} ms/step (first call {times[0]:.1f} s)")
    del net
    gc.collect()
    return res


def run(args: argparse.Namespace) -> int:
    from dynabatch.worker_svc.engine import build_engine
    from dynabatch.worker_svc.engine.loader import resolve_device

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    model = args.model or ("llama-3.2-1b-shape" if gpu else "tiny-random-llama")
    batches = _csv(args.batches, [1, 16, 64, 256] if gpu else [1, 4, 16])
    prompt = args.prompt_len or (256 if gpu else 32)
    out = args.output_len or (256 if gpu else 32)
    n_mixed = args.mixed_requests if args.mixed_requests is not None else (512 if gpu else 32)
    mixed_out = args.mixed_output or (128 if gpu else 16)
    mixed_range = (32, 512) if gpu else (8, 64)
    base_batches = _csv(args.baseline_batches, [1, 64, 256] if gpu else [1, 4])
    rng = random.Random(0)

    bandwidth = measure_hbm_bandwidth(device)
    engine = build_engine(model, device=args.device, kv_fraction=args.kv_fraction,
                          max_running=max(batches + [256 if gpu else 16]),
                          prefill_token_budget=args.prefill_budget,
                          compile_decode=False if args.eager_decode else None,
                          compile_prefill=False if args.eager_prefill else None,
                          prefill_graphs=not args.no_prefill_graphs, gemv_rows=args.gemv_rows)
    roof = Roofline(engine, bandwidth)
    print(f"{model} on {torch.cuda.get_device_name() if gpu else platform.processor() or 'cpu'}: "
          f"start-up {engine.startup_s:.1f} s, {engine.kv.num_blocks} KV blocks, weights "
          f"{roof.param_bytes / 1e9:.2f} GB, gemv rows {engine.runner.gemv_rows}"
          + (f", copy bandwidth {bandwidth / 1e12:.3f} TB/s" if bandwidth else ""))
    print("start-up phases: " + ", ".join(f"{k} {v:.1f} s"
                                          for k, v in engine.startup_phases.items()))
    drive(engine, _requests(2, [prompt, prompt // 2], 4, rng, "warm-"))   # first prefill shapes
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    rows, decode_pts = [], []
    print(f"{'batch':>6} {'tok/s':>10} {'decode tok/s':>13} {'ms/step':>8} {'replay ms':>9} "
          f"{'floor ms':>9} {'GB/s':>8} {'%roof':>6}")
    for b in batches:
        res, pts = offline(engine, roof, b, prompt, out, rng)
        rows.append(res)
        decode_pts += pts
        print(f"{b:>6} {res['tok_s']:>10.1f} {res['decode_tok_s']:>13.1f} "
              f"{res['ms_per_step']:>8.3f} {res.get('graph_replay_ms', float('nan')):>9.3f} "
              f"{res.get('roofline_ms', float('nan')):>9.3f} "
              f"{res['achieved_GBps']:>8.1f} {res.get('pct_roofline', float('nan')):>6.1f}")
    lens = [rng.randint(*mixed_range) for _ in range(n_mixed)]
    secs, recs, n_tok = drive(engine, _requests(n_mixed, lens, mixed_out, rng, "mix-"))
    mixed = {"requests": n_mixed, "prompt_range": list(mixed_range), "output_len": mixed_out,
             "seconds": round(secs, 3), "tok_s": round(n_tok / secs, 1),
             "steps": len(recs), "preemptions": engine.stats().preemptions,
             "prefill_s": round(sum(r.seconds for r in recs if r.kind == "prefill"), 3),
             "decode_s": round(sum(r.seconds for r in recs if r.kind == "decode"), 3)}
    print(f"mixed: {n_mixed} requests, prompts {mixed_range}, {mixed_out} new each: "
          f"{mixed['tok_s']:.1f} tok/s over {secs:.2f} s (prefill {mixed['prefill_s']} s, "
          f"decode {mixed['decode_s']} s, {len(recs)} steps)")
    prefill_pts = lone_prefills(engine, [n for n in (64, 128, 256, 512, 1024, 2048, 4096)
                                         if n <= min(args.prefill_budget, engine.max_model_len)
                                         and (gpu or n <= 256)], rng)
    print("lone prefill ms: " + ", ".join(f"{p['tokens']}: {p['ms']:.2f}" for p in prefill_pts))
    mem = {}
    if gpu:
        mem = {"peak_allocated_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2),
               "weights_GB": round(roof.param_bytes / 1e9, 3),
               "kv_pool_GB": round(engine.kv.data.numel() * engine.kv.data.element_size() / 1e9, 2)}
        print(f"memory: {mem}")
    stats, startup_s, dtype = engine.stats(), engine.startup_s, engine.kv.data.dtype
    phases = {k: round(v, 2) for k, v in engine.startup_phases.items()}
    compiled = engine.runner.compiled
    compiled_prefill = engine.runner.compiled_prefill
    prefill_graphs = engine.runner.prefill_graphs is not None
    gemv_rows = engine.runner.gemv_rows
    del engine, roof
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    baseline = hf_baseline(model, device, dtype, base_batches, prompt, out) if base_batches else {}
    ratios = {b: round(r["tok_s"] / baseline[str(b)]["tok_s"], 2)
              for r in rows for b in [r["batch"]] if str(b) in baseline}
    if ratios:
        print("engine / HF static generate (end-to-end tok/s): "
              + ", ".join(f"batch {b}: {x}x" for b, x in ratios.items()))
    result = {
        "command": " ".join(["python -m dynabatch.bench.engine_bench"] + sys.argv[1:]),
        "machine": {"gpu": torch.cuda.get_device_name() if gpu else "cpu",
                    "torch": torch.__version__, "transformers": _tf_version(),
                    "copy_bandwidth_TBps": round(bandwidth / 1e12, 3) if bandwidth else None},
        "model": model, "dtype": str(dtype).removeprefix("torch."),
        "date": datetime.date.today().isoformat(), "compile_decode": compiled,
        "compile_prefill": compiled_prefill,
        "prefill_graphs": prefill_graphs, "gemv_rows": gemv_rows,
        "startup_s": round(startup_s, 2), "startup_phases_s": phases,
        "kv_block_size": stats.kv_block_size, "kv_blocks_total": stats.kv_blocks_total,
        "max_running": stats.max_running, "max_model_len": stats.max_model_len,
        "max_batch_tokens": args.prefill_budget, "prompt_len": prompt, "output_len": out,
        "offline": rows, "mixed": mixed, "memory": mem, "hf_static_generate": baseline,
        "ratio_vs_hf_static": ratios, "decode": decode_pts, "prefill": prefill_pts,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _tf_version() -> str:
    import transformers
    return transformers.__version__


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
