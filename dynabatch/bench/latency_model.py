"""The simulated worker's latency model: how long one engine step takes, and how much KV fits.

One engine step runs the decode of every running sequence plus (chunked prefill) up to
``max_batch_tokens`` prompt tokens. Its time is linear in what it reads and computes::

    step_ms = base_ms                          # launch overhead + reading the weights once
            + per_seq_ms     * decode_batch    # per-sequence compute (matmuls, sampling)
            + per_ctx_ms     * context_tokens  # reading the KV of every decoding sequence
            + max(prefill_floor_ms,            # a step with prefill costs at least this more
                  prefill_tok_ms * prefill_tokens    # prefill matmuls, per prompt token
                  + prefill_attn_ms * attn_units)    # attention: sum of t * (prefix + t/2)

so a lone prompt of P tokens takes ``prefill_ms(P) = base + prefill_tok*P + prefill_attn*P*P/2``
and its later tokens ``decode_ms(1, context)`` each.

Models are JSON files (``models/*.json``) carrying their provenance. They come from
:func:`fit_engine_bench` (measured engine runs, schema below) or :func:`derive_from_anchors`
(the shipped defaults, derived from the H200 decode anchors; see the "provenance" of each file).

Engine-benchmark JSON schema (what ``fit_engine_bench`` reads; extra keys are ignored)::

    {"machine": {"gpu": "NVIDIA H200", ...}, "model": "llama-3.2-1b-shape", "date": "2026-11-23",
     "kv_block_size": 16, "kv_blocks_total": 200000, "max_running": 256, "max_model_len": 8192,
     "max_batch_tokens": 2048,
     "prefill": [{"tokens": 512, "ms": 3.1}, ...],                          # one prompt alone
     "decode":  [{"batch": 64, "context_tokens": 24576, "ms": 2.9}, ...]}   # context summed over batch
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "h200-llama1b"


@dataclass(frozen=True)
class LatencyModel:
    name: str
    base_ms: float
    per_seq_ms: float
    per_ctx_ms: float
    prefill_tok_ms: float
    prefill_attn_ms: float
    kv_blocks_total: int
    # Measured engines run prefill outside CUDA graphs: short prompts cost a launch-bound floor.
    prefill_floor_ms: float = 0.0
    kv_block_size: int = 16
    max_running: int = 256
    max_model_len: int = 8192
    max_batch_tokens: int = 2048
    # This project's engine runs prefill chunks and decodes in separate, alternating steps
    # (worker_svc/engine/scheduler.py); vLLM-style engines mix them in one step (False).
    alternate_prefill: bool = False
    # Serving-loop time per step that the engine benchmark does not see (fitted to live runs).
    loop_ms: float = 0.0
    # What a chunk costs beyond its per-token terms when decodes ride along it (a mixed step,
    # --mixed-steps), fitted to whole-step timings (fit_mixed_steps); None: the lone-prompt
    # floor. A lone prompt's floor is its own forward's launch overhead, which a mixed step has
    # already paid in its decode part: H100, 8B shape, a 64-token chunk added 1.85 ms to a
    # decode step, not prefill_floor_ms (bench/results/session16_h100).
    mixed_prefill_ms: float | None = None
    provenance: dict = field(default_factory=dict, compare=False)

    def step_ms(self, decode_batch: int, context_tokens: int, prefill_tokens: int = 0,
                attn_units: float = 0.0) -> float:
        prefill = 0.0
        if prefill_tokens > 0:
            work = self.prefill_tok_ms * prefill_tokens + self.prefill_attn_ms * attn_units
            mixed = decode_batch > 0 and self.mixed_prefill_ms is not None
            prefill = self.mixed_prefill_ms + work if mixed else max(self.prefill_floor_ms, work)
        return (self.base_ms + self.loop_ms + self.per_seq_ms * decode_batch
                + self.per_ctx_ms * context_tokens + prefill)

    def prefill_ms(self, tokens: int) -> float:
        """A lone prompt prefilled in one step (no decodes alongside)."""
        return self.step_ms(0, 0, tokens, tokens * tokens / 2)

    def decode_ms(self, batch: int, context_tokens: int) -> float:
        return self.step_ms(batch, context_tokens)

    def with_kv(self, kv_blocks_total: int) -> "LatencyModel":
        return replace(self, kv_blocks_total=kv_blocks_total,
                       name=f"{self.name}-kv{kv_blocks_total}")

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        p = self.provenance
        kind = p.get("kind", "unknown")
        return (f"{self.name} ({kind}; {p.get('gpu', '?')}, {p.get('model_shape', '?')}, "
                f"{p.get('date', '?')}): decode(1, 1k ctx) {self.decode_ms(1, 1024):.2f} ms, "
                f"decode(64, 64k ctx) {self.decode_ms(64, 65536):.2f} ms, prefill(1k) "
                f"{self.prefill_ms(1024):.2f} ms, KV {self.kv_blocks_total} x "
                f"{self.kv_block_size} tokens, max_running {self.max_running}"
                + (f", serving loop {self.loop_ms:g} ms/step" if self.loop_ms else "")
                + (", prefill and decode in alternating steps" if self.alternate_prefill else ""))


def load_model(name_or_path: str = DEFAULT_MODEL) -> LatencyModel:
    """A shipped model by name (``models/<name>.json``) or any model JSON by path."""
    path = Path(name_or_path)
    if not path.exists():
        path = MODELS_DIR / f"{name_or_path}.json"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in MODELS_DIR.glob("*.json")))
        raise FileNotFoundError(f"no latency model {name_or_path!r} (shipped: {known})")
    data = json.loads(path.read_text())
    if "prefill" in data and "decode" in data and "base_ms" not in data:
        model = fit_engine_bench(data, name=path.stem)
        model.provenance.update(source=str(path), fit=fit_residuals(model, data),
                                bench_command=data.get("command", "?"))
        return model
    return LatencyModel(**data)


def fit_residuals(model: LatencyModel, data: dict) -> dict:
    """Relative error of the model on each measured point of an engine benchmark JSON."""
    dec = [model.decode_ms(d["batch"], d["context_tokens"]) / d["ms"] - 1 for d in data["decode"]]
    pre = [model.prefill_ms(p["tokens"]) / p["ms"] - 1 for p in data.get("prefill", [])]
    worst = lambda xs: max((abs(x) for x in xs), default=0.0)
    return {"decode_max_rel_err": worst(dec), "prefill_max_rel_err": worst(pre),
            "prefill_rel_err": [round(x, 3) for x in pre]}


# --------------------------------------------------------------------------- fitting

def _lstsq_nonneg(rows: list[list[float]], y: list[float]) -> list[float]:
    """Least squares with coefficients clipped at 0 (drop a negative column, refit)."""
    import numpy as np
    a, b = np.asarray(rows, float), np.asarray(y, float)
    active = list(range(a.shape[1]))
    while True:
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (sol >= 0).all() or len(active) == 1:
            out = [0.0] * a.shape[1]
            for i, v in zip(active, sol):
                out[i] = max(0.0, float(v))
            return out
        active.pop(int(np.argmin(sol)))


def fit_engine_bench(data: dict, name: str = "fitted") -> LatencyModel:
    """Fit a model to an engine benchmark JSON (schema in the module docstring)."""
    pre, dec = data.get("prefill", []), data.get("decode", [])
    if len(dec) < 3:
        raise ValueError("engine bench JSON needs >= 3 decode points (batch, context_tokens, ms)")
    base, per_seq, per_ctx = _lstsq_nonneg(
        [[1.0, d["batch"], d["context_tokens"]] for d in dec], [d["ms"] for d in dec])
    tok, attn, floor = 0.0, 0.0, 0.0
    if pre:  # base is shared with decode: fit what the prompt adds on top of it
        extra = sorted((p["tokens"], p["ms"] - base) for p in pre)
        low = min(e for _, e in extra)
        flat = [e for _, e in extra if e <= 1.2 * low]   # the launch-bound floor, if any
        floor = sorted(flat)[len(flat) // 2] if len(flat) >= 2 else 0.0
        above = [(t, e) for t, e in extra if e > 1.2 * low] if floor else extra
        if above:
            tok, attn = _lstsq_nonneg([[t, t * t / 2] for t, _ in above], [e for _, e in above])
        else:
            tok = floor / extra[-1][0]
    machine = data.get("machine", {})
    prov = {"kind": "measured (fitted to engine benchmark)", "gpu": machine.get("gpu", "?"),
            "model_shape": data.get("model", "?"), "date": data.get("date", "?"),
            "points": {"prefill": len(pre), "decode": len(dec)}}
    return LatencyModel(name=name, base_ms=base, per_seq_ms=per_seq, per_ctx_ms=per_ctx,
                        prefill_tok_ms=tok, prefill_attn_ms=attn, prefill_floor_ms=floor,
                        kv_blocks_total=int(data.get("kv_blocks_total", 100_000)),
                        kv_block_size=int(data.get("kv_block_size", 16)),
                        max_running=int(data.get("max_running", 256)),
                        max_model_len=int(data.get("max_model_len", 8192)),
                        max_batch_tokens=int(data.get("max_batch_tokens", 2048)),
                        alternate_prefill=True, provenance=prov)


def fit_mixed_steps(model: LatencyModel, timings: dict) -> LatencyModel:
    """`model` with `mixed_prefill_ms` fitted to whole-step timings (tools/mixed_step_time.py's
    JSON: rows of decodes, context, chunk, decode_ms and mixed_ms, the same k decodes without
    and with a chunk): the median of what each chunk added beyond `prefill_tok_ms` per token
    (the chunk's attention over its prompt's prefix is left in, so it errs long)."""
    rows = [r for r in timings["rows"] if r.get("split", True)]
    if not rows:
        raise ValueError("mixed-step timings hold no rows")
    extra = sorted(r["mixed_ms"] - r["decode_ms"] - model.prefill_tok_ms * r["chunk"]
                   for r in rows)
    fixed = max(0.0, extra[len(extra) // 2])
    prov = dict(model.provenance, mixed_steps={"gpu": timings.get("gpu", "?"), "rows": len(rows),
                                               "residual_ms": [round(e - fixed, 3) for e in extra]})
    return replace(model, mixed_prefill_ms=fixed, provenance=prov)


# --------------------------------------------------------------------------- shipped defaults

# Shapes (from dynabatch.wire.models.NAMED_SHAPES): layers, kv heads, head dim, heads, parameters
# without the input embedding, parameters read per decode step (weights incl. lm_head).
_SHAPES = {
    "llama-3.2-1b-shape": dict(layers=16, kv_heads=8, head_dim=64, heads=32,
                               nonembed=0.973e9, lm_head=0.263e9, weights=1.236e9),
    "llama-3.1-8b-shape": dict(layers=32, kv_heads=8, head_dim=128, heads=32,
                               nonembed=6.98e9, lm_head=0.525e9, weights=8.03e9),
}
H200_BF16_DENSE_FLOPS = 989e12   # NVIDIA H200 SXM datasheet, dense bf16
PREFILL_MFU = 0.40               # assumption: prefill reaches 40% of peak


def derive_from_anchors(anchors: dict, shape: str, kv_blocks_total: int, name: str,
                        date: str) -> LatencyModel:
    """The shipped defaults. Decode: base and per-sequence costs fitted (least squares) to the
    measured gpt-fast decode-only anchors (Llama-3.2-1B shape, prompt 256, out 256, so 384 mean
    context per sequence), with the KV-read cost fixed at the roofline (KV bytes per token / the
    measured HBM bandwidth). Other shapes scale by bytes read per step (weights, KV) and FLOPs per
    token (per-sequence compute, kernel-launch overhead by layer count). Prefill is NOT measured:
    it is a roofline at PREFILL_MFU of the datasheet peak."""
    bw = anchors["hbm_read_TBps"] * 1e12
    ref, tgt = _SHAPES["llama-3.2-1b-shape"], _SHAPES[shape]
    kv_bytes = lambda s: 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * 2  # K+V, bf16
    c_ref = kv_bytes(ref) / bw * 1e3
    pts = anchors["gptfast_model_compile_reduce_overhead_prompt256_out256_decode_only"]
    base_ref, per_seq_ref = _lstsq_nonneg(
        [[1.0, int(b)] for b in pts], [v["ms_per_step"] - c_ref * int(b) * 384 for b, v in pts.items()])
    weights_ms = lambda s: s["weights"] * 2 / bw * 1e3
    overhead = base_ref - weights_ms(ref)
    flops = lambda s: 2 * (s["nonembed"] + s["lm_head"])
    eff = H200_BF16_DENSE_FLOPS * PREFILL_MFU
    model = LatencyModel(
        name=name,
        base_ms=overhead * tgt["layers"] / ref["layers"] + weights_ms(tgt),
        per_seq_ms=per_seq_ref * flops(tgt) / flops(ref),
        per_ctx_ms=kv_bytes(tgt) / bw * 1e3,
        prefill_tok_ms=2 * tgt["nonembed"] / eff * 1e3,
        prefill_attn_ms=4 * tgt["heads"] * tgt["head_dim"] * tgt["layers"] / eff * 1e3,
        kv_blocks_total=kv_blocks_total, provenance={})
    resid = {b: round(model.decode_ms(int(b), int(b) * 384) - v["ms_per_step"], 3)
             for b, v in pts.items()} if shape == "llama-3.2-1b-shape" else None
    prov = {"kind": "derived" if shape != "llama-3.2-1b-shape" else
            "decode fitted to measured anchors; prefill derived (roofline)",
            "gpu": "NVIDIA H200 (141 GB HBM3e)", "model_shape": shape, "date": date,
            "source": "/work/shared/measurements/h200_decode_anchors.json "
                      "(gpt-fast compile decode-only, measured 2026-11-23)",
            "assumptions": " ".join((derive_from_anchors.__doc__ or "").split()),
            "prefill_mfu": PREFILL_MFU, "peak_bf16_flops": H200_BF16_DENSE_FLOPS,
            "fit_residual_ms_at_batch": resid}
    return replace(model, provenance=prov)


def _main() -> None:
    """python -m dynabatch.bench.latency_model ANCHORS.json: rewrite the shipped defaults."""
    import argparse
    import datetime
    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("anchors")
    args = ap.parse_args()
    anchors = json.loads(Path(args.anchors).read_text())
    today = datetime.date.today().isoformat()
    # 1B: the whole H200 for KV (~119 GB after weights/activations at 0.9 utilisation; 512 KiB
    # per 16-token block) -> memory never binds, max_running does.
    one = derive_from_anchors(anchors, "llama-3.2-1b-shape", 200_000, "h200-llama1b", today)
    # 8B constrained: a KV pool of 8 GiB (4096 blocks of 16 tokens, 2 MiB each) -> memory binds.
    eight = derive_from_anchors(anchors, "llama-3.1-8b-shape", 4096, "h200-llama8b-kv8g", today)
    eight.provenance["assumptions"] += (" KV pool limited to 8 GiB (4096 x 16-token blocks) as if"
                                        " the GPU were shared: an assumed, constrained setting.")
    MODELS_DIR.mkdir(exist_ok=True)
    for m in (one, eight):
        (MODELS_DIR / f"{m.name}.json").write_text(json.dumps(m.to_json(), indent=1) + "\n")
        print(m.describe())


if __name__ == "__main__":
    _main()
