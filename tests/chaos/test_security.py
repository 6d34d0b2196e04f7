"""Security: TLS and mTLS with certificates made by the test, bearer-token auth, Redis AUTH and
TLS (rediss://) URLs, no secrets in logs, no pickle/eval of queue data."""
from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import re
import signal
import uuid
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

import dynabatch
from dynabatch.cli.stack import LocalStack, StackConfig
from dynabatch.client import (AsyncDynabatchClient, DynabatchError, Unauthenticated,
                              tls_credentials)
from dynabatch.scheduler_svc.security import TlsFiles
from dynabatch.wire.queue import QueueUnavailable
from dynabatch.wire.redis_queue import RedisQueue

from .conftest import (MODEL, RedisServer, free_port, has_worker, need_redis_server, purge,
                       wait_for)

TOKEN = "tok-" + "9f8e7d6c5b4a" * 3


def _cert(name: str, key, issuer_name, issuer_key, ca: bool, server: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, key, cert: x509.Certificate) -> tuple[str, str]:
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path.with_suffix(".pem")), str(path.with_suffix(".key"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """A self-signed CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("dynabatch-test-ca", ca_key, None, None, ca=True, server=False)
    files = {"ca": _write(d / "ca", ca_key, ca)[0]}
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        files[name], files[name + "_key"] = _write(d / name, key,
                                                   _cert(name, key, ca.subject, ca_key, False, server))
    return files


async def _one(target: str, **client_args) -> int:
    async with AsyncDynabatchClient(target, timeout=10, resume_retries=0, **client_args) as c:
        return len((await c.generate(prompt_token_ids=[1, 2], max_tokens=3, ignore_eos=True)).token_ids)


def _stack(**scheduler_options) -> LocalStack:
    return LocalStack(StackConfig(model=MODEL, engine="fake", scheduler_options=scheduler_options))


async def test_tls_and_mtls(pki):
    async with _stack(tls=TlsFiles(pki["server"], pki["server_key"])) as stack:
        assert await _one(stack.target, credentials=tls_credentials(pki["ca"])) == 3
        with pytest.raises(DynabatchError):                 # plaintext client: refused
            await _one(stack.target)
    mtls = TlsFiles(pki["server"], pki["server_key"], client_ca=pki["ca"])
    async with _stack(tls=mtls) as stack:
        with pytest.raises(DynabatchError):                 # no client certificate: refused
            await _one(stack.target, credentials=tls_credentials(pki["ca"]))
        creds = tls_credentials(pki["ca"], pki["client"], pki["client_key"])
        assert await _one(stack.target, credentials=creds) == 3


async def test_bearer_token(caplog):
    caplog.set_level(logging.DEBUG)
    async with _stack(auth_token=TOKEN) as stack:
        for token in (None, "wrong", TOKEN + "x"):
            with pytest.raises(Unauthenticated):
                await _one(stack.target, token=token)
        assert await _one(stack.target, token=TOKEN) == 3
        async with grpc.aio.insecure_channel(stack.target) as channel:   # probes stay open
            resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert TOKEN not in caplog.text


async def test_redis_auth_and_redacted_url(private_redis, prefix, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = StackConfig(model=MODEL, engine="fake", redis_url=private_redis.url, redis_prefix=prefix)
    try:
        async with LocalStack(cfg) as stack:
            assert await _one(stack.target) == 3
            assert private_redis.password not in stack.queue.url
    finally:
        await purge(private_redis.url, prefix)
    assert private_redis.password not in caplog.text


@pytest.fixture
def tls_redis(pki, tmp_path):
    """A redis-server of this test's own serving TLS only (certificate from `pki`), with AUTH."""
    need_redis_server()
    server = RedisServer(free_port(), "tls-s3cret-" + uuid.uuid4().hex[:8], tmp_path,
                         tls={"cert": pki["server"], "key": pki["server_key"], "ca": pki["ca"]})
    try:
        server.start()
    except RuntimeError as e:       # built without TLS: the tls-* directives are unknown
        if "Bad directive" in str(e) and ">>> 'tls-" in str(e):
            pytest.skip(f"redis-server has no TLS support: {e}")
        raise
    yield server
    server.kill()


def _scheduler(procs, url: str, prefix: str, port: int):
    return procs.start("scheduler", "scheduler", "--redis-url", url, "--redis-prefix", prefix,
                       "--listen", f"127.0.0.1:{port}", "--model", MODEL, "--metrics-port", "0")


async def test_redis_tls_url_end_to_end(tls_redis, procs, prefix):
    """Scheduler and worker processes meet in Redis over TLS (rediss://, the CA in the URL);
    neither logs the password."""
    url, port = tls_redis.url, free_port()
    assert url.startswith("rediss://") and "ssl_ca_certs=" in url
    try:
        worker = procs.worker(url, prefix)
        sched = _scheduler(procs, url, prefix, port)
        async with AsyncDynabatchClient(f"127.0.0.1:{port}", timeout=5, resume_retries=0) as c:
            await wait_for(lambda: has_worker(c), 60, "scheduler serving with a worker over TLS",
                           every_s=0.2)
        assert await _one(f"127.0.0.1:{port}") == 3
    finally:
        await purge(url, prefix)
    for proc in (worker, sched):
        assert f"rediss://:***@127.0.0.1:{tls_redis.port}" in proc.output()   # logged, redacted
        assert tls_redis.password not in proc.output()
        assert "Traceback" not in proc.output()


async def test_plain_redis_url_on_tls_port_fails_cleanly(tls_redis, procs, prefix):
    """redis:// against a TLS-only port: a bounded QueueUnavailable naming the cause, a clear
    log line, and a scheduler that still stops on SIGTERM (not stuck in its startup retries)."""
    plain = tls_redis.url.replace("rediss://", "redis://", 1).split("?")[0]
    queue = RedisQueue(plain, prefix)
    with pytest.raises(QueueUnavailable):
        await asyncio.wait_for(queue.epoch(), 15)
    await queue.close()
    sched = _scheduler(procs, plain, prefix, free_port())
    await wait_for(lambda: "queue unavailable" in sched.output(), 30, "the scheduler's warning")
    assert re.search(r"restore: queue unavailable \(redis unreachable: ConnectionError: .*"
                     r"(reset|closed)", sched.output()), sched.output()
    sched.signal(signal.SIGTERM)
    assert sched.popen.wait(10) == 0
    assert tls_redis.password not in sched.output()


def test_queue_data_is_never_unpickled_or_evaluated():
    root = Path(dynabatch.__file__).parent
    forbidden = re.compile(r"\bimport pickle\b|\bpickle\.loads?\b|(?<![.\w])eval\(|(?<![.\w])exec\(|"
                           r"\bmarshal\.loads\b|yaml\.load\(")
    offenders = [str(p.relative_to(root)) for sub in ("wire", "scheduler_svc", "worker_svc", "client")
                 for p in (root / sub).rglob("*.py") if forbidden.search(p.read_text())]
    assert offenders == []
