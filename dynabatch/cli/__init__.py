"""The `dynabatch` command: up | scheduler | worker | generate | bench.

The only module that imports everything; each subcommand's work lives in its own package.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from dynabatch.wire.models import DEFAULT_MODEL

POLICY_HELP = "batching policy: static, naive, fcfs, dynamic, multibin, latency, throughput, coalescing, adaptive"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=os.environ.get("DYNABATCH_REDIS_URL"),
                   help="Redis URL (env DYNABATCH_REDIS_URL); unset: the in-process queue")
    p.add_argument("--redis-prefix", default=os.environ.get("DYNABATCH_REDIS_PREFIX", "dynabatch:"),
                   help="key prefix in Redis (default dynabatch:)")
    p.add_argument("--log-level", default=os.environ.get("DYNABATCH_LOG_LEVEL", "INFO"))
    p.add_argument("--otlp-endpoint", default=None,
                   help="export traces over OTLP/gRPC here, e.g. http://localhost:4317 (default: "
                        "OTEL_EXPORTER_OTLP_ENDPOINT; neither set: no tracing)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics port (env DYNABATCH_METRICS_PORT; default 9090 for "
                        "scheduler, 9091 for worker, off for up)")


def _policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default=os.environ.get("DYNABATCH_POLICY", "fcfs"), help=POLICY_HELP)
    p.add_argument("--policy-opt", action="append", metavar="KEY=VALUE",
                   default=os.environ.get("DYNABATCH_POLICY_OPTS", "").split(),
                   help="set a policy knob, e.g. tpot_target_s=0.05 max_num_seqs=256 "
                        "(repeatable; env DYNABATCH_POLICY_OPTS, space-separated)")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["torch", "fake"], default="torch",
                   help="torch: the real engine; fake: model-free (tests, load benchmarks)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--max-running", type=int, default=256, help="most sequences run at once")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="KV cache blocks (default: sized from free GPU memory, or 4096 on CPU)")
    p.add_argument("--mixed-steps", action="store_true",
                   help="torch engine: decodes ride along prefill steps (as vLLM's chunked "
                        "prefill) instead of alternating with them")
    p.add_argument("--step-prefill-tokens", type=_positive_int, default=8192, metavar="N",
                   help="torch engine: most prompt tokens one step prefills (longer prompts "
                        "are chunked; vLLM's max_num_batched_tokens). With --mixed-steps the "
                        "dynamic policies lower it further while decodes run (default 8192)")
    p.add_argument("--fake-step-delay-ms", type=float, default=_env_float("DYNABATCH_FAKE_STEP_DELAY_MS", 0),
                   help="fake engine: sleep this long per step, to stand in for model time "
                        "(env DYNABATCH_FAKE_STEP_DELAY_MS)")
    p.add_argument("--fake-crash-token", type=int, default=None,
                   help="fake engine (chaos tests): the process dies when it steps a request "
                        "whose prompt holds this token id")


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _security_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--tls-cert", default=env("DYNABATCH_TLS_CERT"),
                   help="PEM server certificate: serve gRPC over TLS (env DYNABATCH_TLS_CERT)")
    p.add_argument("--tls-key", default=env("DYNABATCH_TLS_KEY"),
                   help="PEM private key of --tls-cert (env DYNABATCH_TLS_KEY)")
    p.add_argument("--tls-client-ca", default=env("DYNABATCH_TLS_CLIENT_CA"),
                   help="PEM CA: require client certificates it signed, mTLS (env DYNABATCH_TLS_CLIENT_CA)")
    p.add_argument("--auth-token-file", default=env("DYNABATCH_AUTH_TOKEN_FILE"),
                   help="file holding the bearer token every call must carry (env "
                        "DYNABATCH_AUTH_TOKEN_FILE, or the token itself in DYNABATCH_AUTH_TOKEN)")
    p.add_argument("--max-message-bytes", type=int,
                   default=int(env("DYNABATCH_MAX_MESSAGE_BYTES", 8 << 20)),
                   help="largest gRPC message accepted or sent (env DYNABATCH_MAX_MESSAGE_BYTES)")
    p.add_argument("--max-prompt-tokens", type=int,
                   default=int(env("DYNABATCH_MAX_PROMPT_TOKENS", 32_768)),
                   help="longest prompt accepted, in tokens (env DYNABATCH_MAX_PROMPT_TOKENS)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynabatch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run scheduler + one worker locally and send a burst of requests")
    _common(up)
    _engine_args(up)
    up.add_argument("--model", default=DEFAULT_MODEL, help="model name or from_pretrained path")
    _policy_args(up)
    up.add_argument("--requests", type=int, default=64, help="how many requests to send")
    up.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens per request")
    up.add_argument("--json", metavar="PATH", help="write the summary as JSON")

    sch = sub.add_parser("scheduler", help="run the scheduler service (gRPC)")
    _common(sch)
    sch.add_argument("--listen", default=os.environ.get("DYNABATCH_LISTEN", "0.0.0.0:50051"))
    sch.add_argument("--model", action="append", help="model(s) served (repeatable)")
    _policy_args(sch)
    sch.add_argument("--scheduler-id", default=os.environ.get("DYNABATCH_SCHEDULER_ID"),
                     help="stable id (its token stream in Redis); default: random")
    sch.add_argument("--drain-grace-s", type=float, default=_env_float("DYNABATCH_DRAIN_GRACE_S", 30.0),
                     help="on SIGTERM, how long running streams may finish before they are handed "
                          "back to the next instance (env DYNABATCH_DRAIN_GRACE_S)")
    _security_args(sch)

    wk = sub.add_parser("worker", help="run a worker: pulls work, runs the model")
    _common(wk)
    _engine_args(wk)
    wk.add_argument("--model", default=os.environ.get("DYNABATCH_MODEL", DEFAULT_MODEL))
    wk.add_argument("--worker-id", default=os.environ.get("DYNABATCH_WORKER_ID"))
    wk.add_argument("--health-listen", default=os.environ.get("DYNABATCH_HEALTH_LISTEN", "0.0.0.0:50052"),
                    help="grpc.health.v1 endpoint for probes")
    wk.add_argument("--heartbeat-ttl-s", type=float, default=_env_float("DYNABATCH_HEARTBEAT_TTL_S", 3.0),
                    help="a worker silent this long is dead and its requests are re-run elsewhere "
                         "(env DYNABATCH_HEARTBEAT_TTL_S)")

    gen = sub.add_parser("generate", help="stream one prompt's output to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--target", default=os.environ.get("DYNABATCH_TARGET", "127.0.0.1:50051"))
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--model", default="")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    gen.add_argument("--tls-ca", default=os.environ.get("DYNABATCH_TLS_CA"),
                     help="PEM CA of the scheduler's certificate: connect over TLS (env DYNABATCH_TLS_CA)")
    gen.add_argument("--tls-client-cert", default=os.environ.get("DYNABATCH_TLS_CLIENT_CERT"),
                     help="PEM client certificate for mTLS (env DYNABATCH_TLS_CLIENT_CERT)")
    gen.add_argument("--tls-client-key", default=os.environ.get("DYNABATCH_TLS_CLIENT_KEY"),
                     help="PEM key of --tls-client-cert (env DYNABATCH_TLS_CLIENT_KEY)")

    bench = sub.add_parser("bench", help="benchmarks: engine, simulate, replay, capacity, report")
    _mount_bench(bench.add_subparsers(dest="bench_command", required=True))
    return parser


def _mount_bench(sub) -> None:
    try:
        from dynabatch.bench import engine_bench
        eng = sub.add_parser("engine", help="offline engine throughput (tok/s, ms/step, %% of roofline)")
        engine_bench.add_arguments(eng)
        eng.set_defaults(bench_run=engine_bench.run)
    except ImportError:
        pass
    try:
        from dynabatch.bench import commands
        commands.add_subcommands(sub)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "policy_opt"):
        from dynabatch.cli.options import policy_config
        from dynabatch.scheduler_svc.policy import POLICY_NAMES
        given = args.policy if hasattr(args, "policy") else args.policies
        names = [n.strip() for n in given.split(",") if n.strip()]
        for name in names:
            if name not in POLICY_NAMES:
                parser.error(f"policy {name!r}: choose one of {', '.join(POLICY_NAMES)}")
        try:
            args.policy_config = policy_config(args.policy_opt)
        except ValueError as e:
            parser.error(str(e))
    logging.basicConfig(level=getattr(args, "log_level", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "bench":
        return int(args.bench_run(args) or 0)
    if args.command == "generate":
        from dynabatch.cli.generate import generate
        return generate(args)
    if args.command == "up":
        from dynabatch.cli.up import up
        return asyncio.run(up(args))
    return asyncio.run(_serve(args))


async def _serve(args) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not args.redis_url:
        print(f"dynabatch {args.command}: --redis-url is required (separate processes meet in "
              "Redis; `dynabatch up` runs everything in one process without it)", file=sys.stderr)
        return 2
    from dynabatch.wire.queue import connect
    from dynabatch.wire.redis_errors import redact
    logging.getLogger("dynabatch").info("queue: %s (prefix %s)", redact(args.redis_url),
                                        args.redis_prefix)
    from dynabatch.wire.telemetry import setup_tracing
    provider = setup_tracing(f"dynabatch-{args.command}", args.otlp_endpoint)
    queue = connect(args.redis_url, args.redis_prefix)
    try:
        if args.command == "scheduler":
            await _scheduler(args, queue, stop)
        else:
            return await _worker(args, queue, stop)
    finally:
        await queue.close()
        if provider is not None:
            provider.shutdown()       # flush the spans still batched
    return 0


async def _scheduler(args, queue, stop: asyncio.Event) -> None:
    from dynabatch.scheduler_svc.server import SchedulerConfig, SchedulerServer
    from dynabatch.scheduler_svc.validation import Limits
    from dynabatch.wire.telemetry import metrics_port
    cfg = SchedulerConfig(listen=args.listen, models=args.model or [DEFAULT_MODEL],
                          policy=args.policy, policy_config=args.policy_config,
                          drain_grace_s=args.drain_grace_s,
                          limits=Limits(max_prompt_tokens=args.max_prompt_tokens),
                          max_message_bytes=args.max_message_bytes, tls=_tls_files(args),
                          auth_token=_auth_token(args),
                          metrics_port=metrics_port(args.metrics_port, 9090))
    if args.scheduler_id:
        cfg.scheduler_id = args.scheduler_id
    server = SchedulerServer(queue, cfg)
    if not await _started(server, stop):
        return
    await stop.wait()
    await server.stop()


async def _started(server, stop: asyncio.Event) -> bool:
    """Start the server unless stopped first: start() retries while the queue is unreachable,
    and SIGTERM must still end the process then."""
    starting = asyncio.ensure_future(server.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if starting.done():
        starting.result()                  # raises if start failed
        return True
    starting.cancel()
    logging.getLogger("dynabatch").warning("stopped before the scheduler started")
    return False


def _tls_files(args):
    from dynabatch.scheduler_svc.security import TlsFiles
    if not (args.tls_cert or args.tls_key):
        return None
    if not (args.tls_cert and args.tls_key):
        raise SystemExit("dynabatch scheduler: --tls-cert and --tls-key go together")
    return TlsFiles(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)


def _auth_token(args) -> str | None:
    if args.auth_token_file:
        with open(args.auth_token_file) as f:
            return f.read().strip() or None
    return os.environ.get("DYNABATCH_AUTH_TOKEN") or None


async def _worker(args, queue, stop: asyncio.Event) -> int:
    from dynabatch.worker_svc.app import new_worker_id, run_worker
    from dynabatch.worker_svc.engine_client import EngineDied
    from dynabatch.worker_svc.engine_proc import EngineSpec
    from dynabatch.worker_svc.config import WorkerConfig
    from dynabatch.wire.telemetry import metrics_port
    cfg = WorkerConfig(worker_id=args.worker_id or new_worker_id(), model=args.model,
                       heartbeat_ttl_s=args.heartbeat_ttl_s,
                       metrics_port=metrics_port(args.metrics_port, 9091))
    spec = EngineSpec(args.engine, args.model, engine_options(args))
    try:
        await run_worker(queue, cfg, spec, stop, args.health_listen)
    except EngineDied as e:
        # A crash, as if the worker itself had died: exit at once, no cleanup (a slow exit
        # would only hold its requests longer; they are reclaimed once its heartbeat expires).
        logging.getLogger("dynabatch.worker").error("worker %s: %s", cfg.worker_id, e)
        logging.shutdown()
        os._exit(e.exit_code)
    return 0


def engine_options(args) -> dict:
    """Engine keyword arguments from the CLI flags."""
    if args.engine == "fake":
        return {"max_running": args.max_running, "step_delay_s": args.fake_step_delay_ms / 1000,
                "crash_token_id": args.fake_crash_token,
                **({"num_kv_blocks": args.kv_blocks} if args.kv_blocks else {})}
    return {"device": args.device, "max_running": args.max_running, "num_kv_blocks": args.kv_blocks,
            "mixed_steps": args.mixed_steps, "prefill_token_budget": args.step_prefill_tokens}


if __name__ == "__main__":
    sys.exit(main())
