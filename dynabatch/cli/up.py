"""`dynabatch up`: the whole stack locally, a burst of requests through the SDK, a summary."""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dynabatch.cli.stack import LocalStack, StackConfig
from dynabatch.client import AsyncDynabatchClient, DynabatchError

WORDS = ("the scheduler batches requests by memory and latency so every token arrives on time "
         "while the worker keeps its cache full and its steps short").split()


def prompts(n: int, max_tokens: int, seed: int = 0) -> list[tuple[str, int]]:
    """n (prompt, max_tokens) pairs of varied lengths, the same for the same seed."""
    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))),
             rng.randint(max(1, max_tokens // 2), max_tokens)) for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def _one(client: AsyncDynabatchClient, prompt: str, max_tokens: int, record: dict) -> None:
    start = time.perf_counter()
    first = last = None
    n = 0
    try:
        async for msg in client.stream(prompt, max_tokens=max_tokens, ignore_eos=True):
            if msg.token_ids:
                now = time.perf_counter()
                first = first or now
                last = now
                n += len(msg.token_ids)
    except DynabatchError as e:
        record["errors"].append(str(e))
        return
    record["output_tokens"] += n
    record["completed"] += 1
    if first is not None:
        record["ttft"].append((first - start) * 1000)
        if n > 1:
            record["tpot"].append((last - first) * 1000 / (n - 1))


async def run_load(target: str, n: int, max_tokens: int, console: Console | None = None) -> dict:
    """Send n requests at once, return the summary dict (the --json schema)."""
    record = {"completed": 0, "output_tokens": 0, "ttft": [], "tpot": [], "errors": []}
    start = time.perf_counter()
    async with AsyncDynabatchClient(target, timeout=600) as client:
        with Progress(console=console, transient=True, disable=console is None) as progress:
            task = progress.add_task("requests", total=n)

            async def tracked(p: str, m: int) -> None:
                await _one(client, p, m, record)
                progress.advance(task)
            await asyncio.gather(*(tracked(p, m) for p, m in prompts(n, max_tokens)))
    return {
        "requests": n, "completed": record["completed"], "failed": n - record["completed"],
        "output_tokens": record["output_tokens"],
        "ttft_ms": {"p50": percentile(record["ttft"], 50), "p99": percentile(record["ttft"], 99)},
        "tpot_ms": {"p50": percentile(record["tpot"], 50), "p99": percentile(record["tpot"], 99)},
        "wall_s": time.perf_counter() - start, "errors": record["errors"][:10]}


def _table(summary: dict, args) -> Table:
    t = Table(title=f"dynabatch up: policy {args.policy}, model {args.model}, "
                    f"queue {'redis' if args.redis_url else 'in-process'}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [("requests", summary["requests"]), ("completed", summary["completed"]),
            ("failed", summary["failed"]), ("output tokens", summary["output_tokens"]),
            ("wall time (s)", f"{summary['wall_s']:.2f}"),
            ("output tok/s", f"{summary['output_tokens'] / max(summary['wall_s'], 1e-9):.0f}"),
            ("TTFT p50 / p99 (ms)", f"{summary['ttft_ms']['p50']:.1f} / {summary['ttft_ms']['p99']:.1f}"),
            ("TPOT p50 / p99 (ms)", f"{summary['tpot_ms']['p50']:.2f} / {summary['tpot_ms']['p99']:.2f}")]
    for k, v in rows:
        t.add_row(k, str(v))
    return t


async def up(args) -> int:
    from dynabatch.cli import engine_options
    from dynabatch.wire.telemetry import metrics_port, setup_tracing
    console = Console(stderr=True)
    provider = setup_tracing("dynabatch", args.otlp_endpoint)
    cfg = StackConfig(model=args.model, policy=args.policy, policy_config=args.policy_config,
                      engine=args.engine,
                      engine_options=engine_options(args), redis_url=args.redis_url,
                      metrics_port=metrics_port(args.metrics_port, None))
    console.print(f"starting scheduler + worker ({args.engine} engine, model {args.model})...")
    try:
        async with LocalStack(cfg) as stack:
            summary = await run_load(stack.target, args.requests, args.max_tokens, console)
    finally:
        if provider is not None:
            provider.shutdown()       # flush the spans still batched
    summary["policy"], summary["model"] = args.policy, args.model
    summary["queue"] = "redis" if args.redis_url else "in-process"
    Console().print(_table(summary, args))
    for err in summary["errors"]:
        console.print(f"[red]error:[/red] {err}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failed"] == 0 else 1
