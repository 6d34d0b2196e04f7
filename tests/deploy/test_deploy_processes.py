"""The dev overlay's containers run as the manifests say, on this machine: redis-server with the
Redis container's command line, then the scheduler and the worker with their args and env as the
kubelet would build them (only addresses rewritten to free loopback ports: Redis, the OTLP
endpoint, the listen and metrics ports). Checks what the probes see (NOT_SERVING until the model
is loaded, then SERVING), one request end to end through the AUTH'd Redis, /metrics where the
prometheus.io/* annotations say, spans arriving over OTLP/gRPC under each OTEL_SERVICE_NAME, and
that SIGTERM finishes within the pods' termination grace periods."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy_support import ROOT
from manifests import by_component, container_env, expand, pod_spec

SERVING = health_pb2.HealthCheckResponse.SERVING


class OtlpReceiver:
    """An OTLP/gRPC trace endpoint on loopback (opentelemetry-proto's TraceService) that records
    the service.name of every span it receives."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
        self.services: dict[str, int] = {}
        lock = threading.Lock()
        outer = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                with lock:
                    for rs in request.resource_spans:
                        name = next((kv.value.string_value for kv in rs.resource.attributes
                                     if kv.key == "service.name"), "")
                        n = sum(len(ss.spans) for ss in rs.scope_spans)
                        outer.services[name] = outer.services.get(name, 0) + n
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def scrape(port: int, path: str) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int, service: str = "") -> int | None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1).status
        except grpc.RpcError:
            return None


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """args with --flag's value replaced (the manifests use the --flag=value form)."""
    out = [a for a in args if not a.startswith(flag + "=")]
    assert len(out) == len(args) - 1, f"{flag} not in {args}"
    return out + [f"{flag}={value}"]


@pytest.fixture
def dev_stack(rendered, tmp_path):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server not installed")
    objs = rendered("dev")
    procs: list[subprocess.Popen] = []
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("DYNABATCH_", "OTEL_"))}
    base_env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"))

    def start(cmd: list[str], env: dict, name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")
        p = subprocess.Popen(cmd, env={**base_env, **env}, stdout=log, stderr=subprocess.STDOUT,
                             cwd=tmp_path)
        procs.append(p)
        return p

    # Redis exactly as its container runs it, moved to a free loopback port.
    redis_c = pod_spec(by_component(objs, "redis"))["containers"][0]
    redis_env = container_env(objs, redis_c)
    redis_port = free_port()
    cmd = [expand(a, redis_env) for a in redis_c["command"] + redis_c["args"]]
    start(cmd + ["--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
          {}, "redis")
    import redis
    r = redis.Redis(port=redis_port, password=redis_env["REDIS_PASSWORD"])
    wait_for(lambda: _ping(r), 10, "redis")
    with pytest.raises(redis.AuthenticationError):     # AUTH is really on
        redis.Redis(port=redis_port).get("x")

    otlp = OtlpReceiver()

    def process_env(comp: str) -> tuple[list[str], dict]:
        c = pod_spec(by_component(objs, comp))["containers"][0]
        env = container_env(objs, c)
        url = urlsplit(env["DYNABATCH_REDIS_URL"])
        env["DYNABATCH_REDIS_URL"] = urlunsplit(url._replace(
            netloc=f":{url.password}@127.0.0.1:{redis_port}"))
        endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = urlunsplit(endpoint._replace(
            netloc=f"127.0.0.1:{otlp.port}"))
        return [expand(a, env) for a in c["args"]], env

    stack = {"tmp": tmp_path, "objs": objs, "start": start, "process_env": process_env,
             "otlp": otlp}
    yield stack
    otlp.server.stop(0)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def _ping(r) -> bool:
    try:
        return bool(r.ping())
    except Exception:
        return False


def test_dev_processes_serve_and_drain_within_grace(dev_stack):
    from dynabatch.client import DynabatchClient
    objs, start = dev_stack["objs"], dev_stack["start"]
    entry = [sys.executable, "-m", "dynabatch.cli"]       # the images' ENTRYPOINT

    w_args, w_env = dev_stack["process_env"]("worker")
    w_port, w_metrics = free_port(), free_port()
    w_args = with_flag(w_args, "--metrics-port", str(w_metrics))
    worker = start(entry + with_flag(w_args, "--health-listen", f"127.0.0.1:{w_port}"), w_env, "worker")
    s_args, s_env = dev_stack["process_env"]("scheduler")
    s_port, s_metrics = free_port(), free_port()
    s_args = with_flag(s_args, "--metrics-port", str(s_metrics))
    sched = start(entry + with_flag(s_args, "--listen", f"127.0.0.1:{s_port}"), s_env, "scheduler")

    try:
        wait_for(lambda: health(w_port) == SERVING, 120, "worker ready (startup probe)", worker)
        wait_for(lambda: health(s_port) == SERVING, 120, "scheduler ready", sched)
        live = pod_spec(by_component(objs, "scheduler"))["containers"][0]["livenessProbe"]["grpc"]
        assert health(s_port, live.get("service", "")) == SERVING, "liveness probe's service"

        with DynabatchClient(f"127.0.0.1:{s_port}", timeout=60) as client:
            out = client.generate(prompt_token_ids=[1, 2, 3], max_tokens=4, ignore_eos=True)
        assert len(out.token_ids) == 4

        # /metrics where the annotations point Prometheus (the port itself is rewritten here)
        for comp, port, metric in (("scheduler", s_metrics, "dynabatch_admissions_total"),
                                   ("worker", w_metrics, "dynabatch_worker_output_tokens_total")):
            notes = by_component(objs, comp)["spec"]["template"]["metadata"]["annotations"]
            assert metric in scrape(port, notes["prometheus.io/path"]), f"{comp} /metrics"

        for comp, proc, port in (("scheduler", sched, s_port), ("worker", worker, w_port)):
            pod = pod_spec(by_component(objs, comp))
            budget = pod["terminationGracePeriodSeconds"]
            pre_stop = pod["containers"][0].get("lifecycle", {}).get("preStop", {})
            budget -= pre_stop.get("sleep", {}).get("seconds", 0)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(budget)        # raises TimeoutExpired: the kubelet would SIGKILL it
            assert proc.returncode == 0, f"{comp} exited {proc.returncode}"
            assert time.monotonic() - t0 < budget
        # the exit flushed the spans: each process exported under its OTEL_SERVICE_NAME
        otlp = dev_stack["otlp"]
        for env in (s_env, w_env):
            assert otlp.services.get(env["OTEL_SERVICE_NAME"]), (env["OTEL_SERVICE_NAME"],
                                                                 otlp.services)
    except BaseException:
        for name in ("scheduler", "worker", "redis"):
            log = dev_stack["tmp"] / f"{name}.log"
            sys.stderr.write(f"--- {name}.log\n{log.read_text()[-3000:]}\n")
        raise
