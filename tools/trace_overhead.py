"""Measure what tracing costs in throughput: the same burst of requests through a LocalStack with
tracing off (no SDK provider) and on (every request sampled unless --sample-ratio; spans exported
over OTLP/gRPC to a receiver in another process, as Jaeger would be), alternating rounds; prints
output tokens/s of each and the overhead, per wall-clock second and per CPU second of this
process (all its threads; the CPU figure is steadier on a machine shared with other work).

    python tools/trace_overhead.py --engine fake --requests 256 --max-tokens 128 --rounds 5
    python tools/trace_overhead.py --engine torch --model llama-3.2-1b-shape --device cuda
    PYTHONPATH=<other checkout> python tools/trace_overhead.py --off-only   # compare "off" runs

Each burst starts after gc.collect(): in a process with torch loaded a full collection takes
~0.2 s, and where those pauses happened to land decided a 0.7 s burst's figure more than tracing
did.

The fake engine is the worst case: its steps cost almost nothing, so the tracing work is a large
share of the total; with a real model the same work hides behind the GPU step.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from concurrent import futures

import multiprocessing
from multiprocessing.connection import Connection

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from dynabatch.cli.stack import LocalStack, StackConfig
from dynabatch.client import AsyncDynabatchClient

STEP_SPAN_EVERY = 64    # dynabatch.worker_svc.tracing's default (imported lazily: --off-only
                        # also runs against checkouts without it)


class ProtoExporter(SpanExporter):
    """OTLP/gRPC export with opentelemetry-proto alone (encode + TraceService.Export), for
    machines without opentelemetry-exporter-otlp-proto-grpc's dependencies."""

    def __init__(self, target: str) -> None:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        self.encode = encode_spans
        self.channel = grpc.insecure_channel(target)
        self.stub = trace_service_pb2_grpc.TraceServiceStub(self.channel)

    def export(self, spans):
        self.stub.Export(self.encode(spans), timeout=10)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.channel.close()


def exporter(target: str) -> SpanExporter:
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        return ProtoExporter(target)
    return OTLPSpanExporter(endpoint=target, insecure=True)


class CountingReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0

    def Export(self, request, context):
        self.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def receive(conn: Connection) -> None:
    """The receiver process: sends its port, serves until told to stop, sends the span count."""
    receiver = CountingReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    conn.send(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    conn.recv()
    server.stop(0)
    conn.send(receiver.spans)


async def burst(args, provider: TracerProvider | None) -> tuple[float, float]:
    """Output tokens per wall-clock second and per CPU second of one burst of requests."""
    opts = {"max_running": args.max_running}
    if args.engine == "torch":
        opts["device"] = args.device
    traced = {"tracer_provider": provider} if provider is not None else {}
    cfg = StackConfig(model=args.model, engine=args.engine, engine_options=opts,
                      redis_url=args.redis_url, **traced)
    async with LocalStack(cfg) as stack:
        async with AsyncDynabatchClient(stack.target, timeout=600, **traced) as client:
            await client.generate(prompt_token_ids=[1, 2, 3], max_tokens=4, ignore_eos=True)
            gc.collect()
            start, cpu = time.perf_counter(), time.process_time()
            results = await asyncio.gather(*(
                client.generate(prompt_token_ids=[(7 * i + j) % 250 for j in range(32 + i % 64)],
                                max_tokens=args.max_tokens, ignore_eos=True)
                for i in range(args.requests)))
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(len(r.token_ids) for r in results)
    return tokens / wall, tokens / cpu


def step_span_cost(batch: int, every: int, steps: int = 500) -> dict:
    """CPU microseconds per engine step that step spans add, with the worker's WorkerTracing:
    a sampled step (span, one link per request, OTLP encoding), an unsampled one, and the
    average at one sampled step in `every`."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from dynabatch.v1.worker_pb2 import WorkItem
    from dynabatch.worker_svc.engine.api import TokenOutput
    from dynabatch.worker_svc.tracing import WorkerTracing

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing = WorkerTracing(provider.get_tracer("bench"), "w", "m")
    for i in range(batch):
        tracing.pulled(WorkItem(request_id=f"r{i}", prompt_token_ids=[1]))
    outputs = [TokenOutput(f"r{i}", [1], 0) for i in range(batch)]
    memory.clear()

    def per_step(sample_every: int) -> float:
        tracing.step_every = sample_every
        start = time.process_time()
        for _ in range(steps):
            with tracing.step(outputs, time.time_ns(), "decode"):
                pass
        encode_spans(memory.get_finished_spans()).SerializeToString()
        memory.clear()
        return (time.process_time() - start) / steps * 1e6

    sampled, unsampled = per_step(1), per_step(steps + 1)
    return {"step_us_sampled": sampled, "step_us_unsampled": unsampled,
            "step_us_average": sampled / every + unsampled * (every - 1) / every}


async def main(args) -> dict:
    if args.off_only:
        off = [await burst(args, None) for _ in range(args.rounds)]
        return {"engine": args.engine, "model": args.model, "tok_s_off": [w for w, _ in off],
                "median_off": statistics.median(w for w, _ in off),
                "median_off_per_cpu_s": statistics.median(c for _, c in off)}
    from dynabatch.worker_svc import tracing
    tracing.STEP_SPAN_EVERY = args.step_every
    conn, child = multiprocessing.get_context("spawn").Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=receive, args=(child,), daemon=True)
    proc.start()
    port = conn.recv()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(args.sample_ratio)))
    provider.add_span_processor(BatchSpanProcessor(exporter(f"127.0.0.1:{port}")))
    off, on = [], []
    for r in range(args.rounds):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            tps, per_cpu = await burst(args, provider if mode == "on" else None)
            (on if mode == "on" else off).append((tps, per_cpu))
            print(f"round {r} tracing {mode}: {tps:,.0f} output tok/s, {per_cpu:,.0f} per CPU s",
                  file=sys.stderr)
    provider.shutdown()
    conn.send("stop")
    spans = conn.recv()
    proc.join(10)
    steps = step_span_cost(args.max_running, args.step_every)
    # CPU per engine step with tracing off: a full batch makes max_running tokens per step.
    steps["step_share_pct"] = 100 * steps["step_us_average"] / (
        1e6 * args.max_running / statistics.median(c for _, c in off))
    off_m, on_m = statistics.median(w for w, _ in off), statistics.median(w for w, _ in on)
    off_c, on_c = statistics.median(c for _, c in off), statistics.median(c for _, c in on)
    return {"engine": args.engine, "model": args.model, "requests": args.requests,
            "max_tokens": args.max_tokens, "queue": "redis" if args.redis_url else "memory",
            "step_span_every": args.step_every, "sample_ratio": args.sample_ratio,
            "rounds": args.rounds,
            "tok_s_off": [w for w, _ in off], "tok_s_on": [w for w, _ in on],
            "median_off": off_m, "median_on": on_m,
            "overhead_pct": 100 * (off_m - on_m) / off_m,
            "median_off_per_cpu_s": off_c, "median_on_per_cpu_s": on_c,
            "cpu_overhead_pct": 100 * (off_c - on_c) / off_c,
            # each round's on/off pair ran back to back: its ratio cancels slow drifts of a
            # shared machine better than the ratio of medians
            "cpu_overhead_pct_paired": statistics.median(
                100 * (1 - on_r[1] / off_r[1]) for on_r, off_r in zip(on, off)),
            "spans_exported": spans,
            "step_spans": steps}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=["fake", "torch"], default="fake")
    p.add_argument("--model", default="tiny-random-llama")
    p.add_argument("--device", default="auto")
    p.add_argument("--redis-url", default=None, help="Redis queue (default: in-process)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-running", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--off-only", action="store_true",
                   help="only tracing-off rounds (run against another checkout to compare)")
    p.add_argument("--step-every", type=int, default=STEP_SPAN_EVERY,
                   help="one engine step in this many gets a span")
    p.add_argument("--sample-ratio", type=float, default=1.0,
                   help="fraction of traces recorded (parentbased_traceidratio), as "
                        "OTEL_TRACES_SAMPLER_ARG would set it")
    p.add_argument("--json", metavar="PATH", help="also write the result here")
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse()
    result = asyncio.run(main(ns))
    print(json.dumps(result, indent=2))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=2)
