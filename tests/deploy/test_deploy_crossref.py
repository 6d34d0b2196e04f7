"""Cross-references inside the rendered manifests and between them and the code: selectors and
labels, ports and the processes' listen flags, probes, env vars and what the code reads, config and
secret keys, the drain timing, the security settings."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from deploy_support import DEPLOY, OVERLAYS, ROOT
from manifests import (VAR_REF, by_component, component, container_env, containers, env_names,
                       expand, find, listen_port, one, pod_labels, pod_spec, probe_ports,
                       resolve_port, selects, workloads)

DYNABATCH = {"scheduler", "worker"}          # components that run `dynabatch ...`
# Objects an overlay references but does not create: made out of band, as deploy/README.md says.
EXTERNAL = {"gpu": {("Secret", "dynabatch-redis"), ("Secret", "dynabatch-auth")}}
PACKAGE_SOURCE = "\n".join(p.read_text() for p in (ROOT / "dynabatch").rglob("*.py"))

params = pytest.mark.parametrize("overlay", OVERLAYS)


# --- the processes' view: env as the kubelet builds it, args parsed by the real CLI parser

@contextlib.contextmanager
def environ(env: dict):
    saved = {k: v for k, v in os.environ.items() if k.startswith(("DYNABATCH_", "OTEL_"))}
    for k in saved:
        del os.environ[k]
    os.environ.update(env)
    try:
        yield
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update(saved)


def parse(objs: list[dict], container: dict, override: dict | None = None):
    """What `dynabatch <args>` parses inside the container (the parser reads env defaults)."""
    from dynabatch.cli import build_parser
    env = container_env(objs, container, override)
    args = [expand(a, env) for a in container.get("args", [])]
    with environ(env):
        return build_parser().parse_args(args)


def option_strings(command: str) -> set[str]:
    """The exact flags of `dynabatch <command>` (argparse would also accept unique prefixes)."""
    from dynabatch.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return set(sub.choices[command]._option_string_actions)


def dynabatch_containers(objs: list[dict]):
    for w in workloads(objs):
        if component(w) in DYNABATCH:
            for c in pod_spec(w)["containers"]:
                yield w, c


# The port each command serves /metrics on when neither --metrics-port nor DYNABATCH_METRICS_PORT
# is given (cli/__init__.py passes these to telemetry.metrics_port).
METRICS_DEFAULT = {"scheduler": 9090, "worker": 9091}


def metrics_port_of(parsed, env: dict) -> int | None:
    """The /metrics port the process opens, resolved by the code's own rule (flag, env, default)."""
    from dynabatch.wire.telemetry import metrics_port
    with environ(env):
        return metrics_port(parsed.metrics_port, METRICS_DEFAULT[parsed.command])


def flag_ports(parsed, env: dict | None = None) -> set[int]:
    """Every port the process opens, from its parsed flags (--*listen, --*-port) and, given the
    container's env, the /metrics port the code falls back to without --metrics-port."""
    ports = set()
    for name, value in vars(parsed).items():
        if name.endswith("listen") and value:
            ports.add(listen_port(value))
        elif name.endswith("_port") and isinstance(value, int) and value > 0:
            ports.add(value)
    if env is not None and parsed.command in METRICS_DEFAULT:
        port = metrics_port_of(parsed, env)
        if port:
            ports.add(port)
    return ports


# --- tests

@params
def test_args_parse_with_the_real_cli(rendered, overlay):
    objs = rendered(overlay)
    for w, c in dynabatch_containers(objs):
        parsed = parse(objs, c)          # argparse exits on an unknown flag or a bad value
        assert parsed.command == component(w)
        flags = {a.split("=", 1)[0] for a in c["args"] if a.startswith("--")}
        assert flags <= option_strings(parsed.command), f"{component(w)}: abbreviated or unknown"
        assert parsed.redis_url and parsed.redis_url.startswith("redis://")


@params
def test_policy_settings_are_valid(rendered, overlay):
    """The ConfigMap's policy name and options build a PolicyConfig (the scheduler would exit)."""
    from dynabatch.cli.options import policy_config
    from dynabatch.scheduler_svc.policy import POLICY_NAMES
    objs = rendered(overlay)
    parsed = parse(objs, pod_spec(by_component(objs, "scheduler"))["containers"][0])
    assert parsed.policy in POLICY_NAMES
    assert parsed.policy_opt, "no SLA settings reach the scheduler"
    policy_config(parsed.policy_opt)


@params
def test_container_ports_are_the_listen_flags(rendered, overlay):
    objs = rendered(overlay)
    for w, c in dynabatch_containers(objs):
        parsed = parse(objs, c)
        declared = {p["containerPort"] for p in c.get("ports", [])}
        assert declared == flag_ports(parsed, container_env(objs, c)), f"{component(w)}: ports vs flags"
    sched = pod_spec(by_component(objs, "scheduler"))["containers"][0]
    assert resolve_port(sched, "grpc") == listen_port(parse(objs, sched).listen)
    worker = pod_spec(by_component(objs, "worker"))["containers"][0]
    assert resolve_port(worker, "health") == listen_port(parse(objs, worker).health_listen)


@params
def test_probe_ports_exist(rendered, overlay):
    for w in workloads(rendered(overlay)):
        for c in containers(w):
            for probe, handler, port in probe_ports(c):
                assert resolve_port(c, port), f"{component(w)} {probe}.{handler} port {port}"
    # gRPC probes reach the dynabatch health endpoints
    for w, c in dynabatch_containers(rendered(overlay)):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" in c[probe], f"{component(w)} {probe} is not a gRPC probe"


@params
def test_services_select_pods_and_target_declared_ports(rendered, overlay):
    objs = rendered(overlay)
    for svc in find(objs, "Service"):
        matched = [w for w in workloads(objs) if selects(svc["spec"]["selector"], pod_labels(w))]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {len(matched)}"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(resolve_port(c, target) for c in containers(matched[0])), \
                f"Service {svc['metadata']['name']} targetPort {target}"


@params
def test_workload_and_pdb_selectors(rendered, overlay):
    objs = rendered(overlay)
    for w in workloads(objs):
        assert selects(w["spec"]["selector"], pod_labels(w)), w["metadata"]["name"]
        for spread in pod_spec(w).get("topologySpreadConstraints", []):
            assert selects(spread["labelSelector"], pod_labels(w)), "spread counts other pods"
    for pdb in find(objs, "PodDisruptionBudget"):
        matched = [w for w in workloads(objs) if selects(pdb["spec"]["selector"], pod_labels(w))]
        assert len(matched) == 1, pdb["metadata"]["name"]
        assert component(matched[0]) in DYNABATCH


@params
def test_urls_in_env_point_at_services(rendered, overlay):
    """DYNABATCH_REDIS_URL (and any OTLP endpoint) name a Service of this stack and its port."""
    objs = rendered(overlay)
    services = {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]}
                for s in find(objs, "Service")}
    for w, c in dynabatch_containers(objs):
        env = container_env(objs, c)
        urls = [env["DYNABATCH_REDIS_URL"]] + [v for k, v in env.items()
                                              if k.startswith("OTEL_EXPORTER_OTLP") and "ENDPOINT" in k]
        for url in urls:
            parts = urlsplit(url)
            assert parts.port in services.get(parts.hostname, ()), f"{component(w)}: {url}"


@params
def test_env_vars_are_read_by_the_code(rendered, overlay):
    """Each DYNABATCH_* var changes what the process parses (or the code reads it elsewhere);
    OTEL_* vars are the OpenTelemetry SDK's; other vars only feed $(VAR) expansions."""
    objs = rendered(overlay)
    for w, c in dynabatch_containers(objs):
        names = env_names(c)
        referenced = {m for e in c.get("env", []) if "value" in e for m in VAR_REF.findall(e["value"])}
        referenced |= {m for a in c.get("args", []) for m in VAR_REF.findall(a)}
        base = vars(parse(objs, c))
        for name in names:
            where = f"{component(w)} env {name}"
            if name.startswith("DYNABATCH_"):
                try:
                    changed = vars(parse(objs, c, {name: "sentinel-value"})) != base
                except SystemExit:     # the parser rejected the value: so it reads it
                    changed = True
                if not changed:
                    assert name in PACKAGE_SOURCE, f"{where}: no code reads it"
            elif name.startswith("OTEL_"):
                assert name in otel_sdk_variables(), f"{where}: not an OpenTelemetry SDK variable"
                assert "opentelemetry" in PACKAGE_SOURCE, f"{where}: dynabatch does not use OTel"
            else:
                assert name in referenced, f"{where}: neither read by the code nor referenced"


@params
def test_var_references_are_defined_before_use(rendered, overlay):
    """The kubelet leaves an unknown $(VAR) as literal text: a silent misconfiguration."""
    for w in workloads(rendered(overlay)):
        for c in containers(w):
            defined: set[str] = set()
            for e in c.get("env", []):
                for ref in VAR_REF.findall(e.get("value", "")):
                    assert ref in defined, f"{component(w)} env {e['name']}: $({ref})"
                defined.add(e["name"])
            for a in c.get("command", []) + c.get("args", []):
                for ref in VAR_REF.findall(a):
                    assert ref in defined, f"{component(w)} args: $({ref})"


@params
def test_config_secret_and_volume_references_exist(rendered, overlay):
    objs = rendered(overlay)
    external = EXTERNAL.get(overlay, set())
    for w in workloads(objs):
        for c in containers(w):
            for e in c.get("env", []):
                for kind, ref_key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    ref = e.get("valueFrom", {}).get(ref_key)
                    if not ref:
                        continue
                    found = find(objs, kind, ref["name"])
                    if not found:
                        assert (kind, ref["name"]) in external, f"{kind}/{ref['name']} missing"
                        continue
                    assert ref["key"] in found[0]["data"], f"{kind}/{ref['name']} lacks {ref['key']}"
            volumes = {v["name"] for v in pod_spec(w).get("volumes", [])}
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{component(w)} mounts unknown volume {m['name']}"
        for v in pod_spec(w).get("volumes", []):
            if "persistentVolumeClaim" in v:
                one(objs, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
            if "secret" in v and not find(objs, "Secret", v["secret"]["secretName"]):
                assert ("Secret", v["secret"]["secretName"]) in external, v["secret"]["secretName"]
    readme = (DEPLOY / "README.md").read_text()
    for kind, name in external:
        assert f"create secret generic {name}" in readme, f"README must say how to make {name}"


@params
def test_only_dynabatch_pods_reach_redis(rendered, overlay):
    objs = rendered(overlay)
    policies = [p for p in find(objs, "NetworkPolicy")
                if selects(p["spec"]["podSelector"], pod_labels(by_component(objs, "redis")))]
    assert len(policies) == 1
    policy = policies[0]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    allowed = set()
    for rule in policy["spec"]["ingress"]:
        redis = pod_spec(by_component(objs, "redis"))["containers"][0]
        for port in rule["ports"]:
            assert resolve_port(redis, port["port"]) == 6379
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, "only same-namespace pod selectors"
            allowed |= {component(w) for w in workloads(objs)
                        if selects(peer["podSelector"], pod_labels(w))}
    assert allowed == DYNABATCH


@params
def test_termination_grace_covers_the_scheduler_drain(rendered, overlay):
    objs = rendered(overlay)
    sched = by_component(objs, "scheduler")
    c = pod_spec(sched)["containers"][0]
    drain = parse(objs, c).drain_grace_s
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod_spec(sched)["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + drain + 1, "SIGKILL would cut the drain short"
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > drain, \
        "liveness could restart a draining scheduler"


@params
def test_security_and_resources(rendered, overlay):
    for w in workloads(rendered(overlay)):
        pod = pod_spec(w)
        assert pod.get("automountServiceAccountToken") is False, component(w)
        assert pod["securityContext"]["runAsNonRoot"] is True, component(w)
        assert pod["securityContext"]["runAsUser"] > 0
        for c in containers(w):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{component(w)} {kind}"
            if c["securityContext"]["readOnlyRootFilesystem"]:
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                if component(w) in DYNABATCH:
                    assert {"/tmp", "/cache"} <= mounts


def test_dev_overlay_is_cpu_tiny_single_replica(rendered):
    objs = rendered("dev")
    for w in workloads(objs):
        assert w["spec"].get("replicas") == 1, component(w)
        assert "nvidia.com/gpu" not in str(w), f"{component(w)} asks for a GPU"
    worker = pod_spec(by_component(objs, "worker"))["containers"][0]
    parsed = parse(objs, worker)
    assert (parsed.device, parsed.engine, parsed.model) == ("cpu", "torch", "tiny-random-llama")
    sched = pod_spec(by_component(objs, "scheduler"))["containers"][0]
    assert parse(objs, sched).model == ["tiny-random-llama"]


def test_gpu_overlay_is_production_shaped(rendered):
    objs = rendered("gpu")
    sched = by_component(objs, "scheduler")
    assert sched["spec"]["replicas"] >= 2
    # the API token file is on the mounted Secret
    sc = pod_spec(sched)["containers"][0]
    token_file = parse(objs, sc).auth_token_file
    secret_volumes = {v["name"] for v in pod_spec(sched)["volumes"] if "secret" in v}
    assert any(Path(token_file).parent == Path(m["mountPath"]) for m in sc["volumeMounts"]
               if m["name"] in secret_volumes), token_file
    worker = by_component(objs, "worker")
    c = pod_spec(worker)["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert parse(objs, c).device == "cuda"
    # the model path is on a mounted volume in every process that opens it
    for w in (sched, worker):
        cont = pod_spec(w)["containers"][0]
        parsed = parse(objs, cont)
        models = parsed.model if isinstance(parsed.model, list) else [parsed.model]
        mounts = [m["mountPath"] for m in cont["volumeMounts"]]
        for m in models:
            assert any(Path(m).is_relative_to(p) for p in mounts), f"{component(w)}: {m}"
    # dynabatch images come pinned from a registry
    for w, cont in dynabatch_containers(objs):
        name, _, tag = cont["image"].rpartition(":")
        assert "/" in name and tag and tag != "latest", cont["image"]


def adapter_rules() -> list[dict]:
    import yaml
    values = yaml.safe_load((DEPLOY / "overlays" / "gpu" / "prometheus-adapter-values.yaml").read_text())
    return values["rules"]["external"]


def test_hpa_scales_the_worker_on_metrics_the_adapter_serves(rendered):
    objs = rendered("gpu")
    (hpa,) = find(objs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    target = one(objs, ref["kind"], ref["name"])
    assert component(target) == "worker"
    assert "replicas" not in target["spec"], "kubectl apply would reset the HPA's replica count"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    served = {r["name"]["as"] for r in adapter_rules()}
    used = {m["external"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "External"}
    assert used and used <= served, f"HPA metrics {used - served} have no prometheus-adapter rule"


def scheduler_metric_names() -> set[str]:
    """Sample names the scheduler's registry serves once every gauge holds a value."""
    from dynabatch.scheduler_svc.metrics import SchedulerMetrics
    m = SchedulerMetrics()
    m.sla_attainment.set(1.0)
    m.tokens_per_s.set(1.0)
    m.queue_depth.labels("0").set(0)
    return {s.name for fam in m.registry.collect() for s in fam.samples}


def test_adapter_rules_read_metrics_the_code_exports():
    import re
    exported = scheduler_metric_names()
    assert {"dynabatch_queue_depth", "dynabatch_sla_attainment"} <= exported
    for rule in adapter_rules():
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
        assert "<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]
        assert series in exported, f"the scheduler exports no {series}"
        if rule["name"]["as"] != series:     # a derived metric: README's table must say how
            readme = (DEPLOY / "README.md").read_text()
            assert f"`{rule['name']['as']}`" in readme and series in readme
    (miss,) = [r for r in adapter_rules() if r["name"]["as"] == "dynabatch_sla_miss_ratio"]
    assert miss["metricsQuery"].replace(" ", "").startswith("1-"), "miss ratio = 1 - attainment"


def test_readme_table_matches_the_hpa(rendered):
    """deploy/README.md's autoscaling table names each HPA metric with its target."""
    (hpa,) = find(rendered("gpu"), "HorizontalPodAutoscaler")
    readme = (DEPLOY / "README.md").read_text()
    for m in hpa["spec"]["metrics"]:
        name, target = m["external"]["metric"]["name"], m["external"]["target"]
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row, f"README's HPA table lacks {name}"
        value = target.get("averageValue") or target.get("value")
        assert str(value) in row, f"README: {name} target {value}"


@params
def test_scrape_annotations_name_a_metrics_port(rendered, overlay):
    """prometheus.io/* pod annotations (what Prometheus' kubernetes-pods job follows) point at a
    port the container declares and the process opens."""
    objs = rendered(overlay)
    for w in workloads(objs):
        notes = w["spec"]["template"]["metadata"].get("annotations", {})
        if notes.get("prometheus.io/scrape") != "true":
            continue
        port = int(notes["prometheus.io/port"])
        assert notes.get("prometheus.io/path", "/metrics").startswith("/")
        c = pod_spec(w)["containers"][0]
        assert resolve_port(c, "metrics") == port, f"{component(w)}: annotation vs metrics port"
        if component(w) in DYNABATCH:
            assert port in flag_ports(parse(objs, c))


# --- observability wiring: /metrics ports and OTLP export

def otel_sdk_variables() -> set[str]:
    """The OTEL_* variables the OpenTelemetry Python SDK and its OTLP exporter read: the constants
    of opentelemetry.sdk.environment_variables (each named as its value)."""
    from opentelemetry.sdk import environment_variables as otel_env
    return {v for k, v in vars(otel_env).items()
            if k.startswith("OTEL_") and isinstance(v, str) and v == k}


def metrics_services(objs: list[dict], workload: dict) -> list[tuple[dict, dict]]:
    """(Service, port) pairs that select this workload's pods through a port named `metrics`."""
    return [(svc, port) for svc in find(objs, "Service")
            if selects(svc["spec"]["selector"], pod_labels(workload))
            for port in svc["spec"]["ports"] if port.get("name") == "metrics"]


@params
def test_metrics_port_args_container_port_annotation_and_service_agree(rendered, overlay):
    """One number, four places: --metrics-port in args (spelt out, so the manifests say what the
    process opens), the container's `metrics` port, the prometheus.io/port annotation, and the
    `metrics` port of any Service in front of the pods (the scheduler's must have one)."""
    objs = rendered(overlay)
    for w, c in dynabatch_containers(objs):
        comp = component(w)
        flags = [a for a in c["args"] if a.split("=", 1)[0] == "--metrics-port"]
        assert len(flags) == 1, f"{comp}: pass --metrics-port=N explicitly in args"
        parsed = parse(objs, c)
        port = metrics_port_of(parsed, container_env(objs, c))
        assert port == parsed.metrics_port, f"{comp}: env overrides --metrics-port?"
        assert port == METRICS_DEFAULT[comp], f"{comp}: docs and README give {METRICS_DEFAULT[comp]}"
        assert resolve_port(c, "metrics") == port, f"{comp}: containerPort `metrics` vs --metrics-port"
        named = [p for p in c["ports"] if p.get("name") == "metrics"]
        assert len(named) == 1 and named[0].get("protocol", "TCP") == "TCP"
        notes = w["spec"]["template"]["metadata"].get("annotations", {})
        assert notes.get("prometheus.io/scrape") == "true", f"{comp}: not scraped"
        assert notes.get("prometheus.io/port") == str(port), f"{comp}: prometheus.io/port vs {port}"
        assert notes.get("prometheus.io/path") == "/metrics", f"{comp}: prometheus.io/path"
        services = metrics_services(objs, w)
        if comp == "scheduler":
            assert services, "the scheduler Service has no `metrics` port"
        for svc, sp in services:
            where = f"Service {svc['metadata']['name']} port metrics"
            assert sp["port"] == port, f"{where}: {sp['port']} vs --metrics-port {port}"
            assert resolve_port(c, sp.get("targetPort", sp["port"])) == port, f"{where}: targetPort"


@params
def test_otel_env_is_standard_and_exports_to_the_stacks_jaeger(rendered, overlay):
    """Every OTEL_* variable set in any container is one the OpenTelemetry SDK reads (a misspelt
    one is silently ignored); the services export to the Jaeger Service's OTLP/gRPC port, each
    under its own service name."""
    objs = rendered(overlay)
    known = otel_sdk_variables()
    assert {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER"} <= known
    for w in workloads(objs):
        for c in containers(w):
            for name in env_names(c):
                if name.startswith("OTEL_"):
                    assert name in known, f"{component(w)} env {name}: not a standard OTEL_* variable"
    jaeger = one(objs, "Service", "dynabatch-jaeger")
    (grpc_port,) = [p for p in jaeger["spec"]["ports"] if p.get("appProtocol") == "grpc"]
    names = set()
    for w, c in dynabatch_containers(objs):
        env = container_env(objs, c)
        endpoint = urlsplit(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
        assert (endpoint.scheme, endpoint.hostname, endpoint.port) == \
            ("http", "dynabatch-jaeger", grpc_port["port"]), f"{component(w)}: {endpoint.geturl()}"
        assert parse(objs, c).otlp_endpoint is None, "--otlp-endpoint would override the env"
        assert env.get("OTEL_SERVICE_NAME") == f"dynabatch-{component(w)}", component(w)
        names.add(env["OTEL_SERVICE_NAME"])
    assert len(names) == len(DYNABATCH)


def _policy_admits(policy: dict, direction: str, peer_pod: dict | None, port: int,
                   target: dict, objs: list[dict]) -> bool:
    """Does one NetworkPolicy's `direction` (ingress/egress) rules admit this traffic? peer_pod
    None: a peer outside the stack (e.g. Prometheus in another namespace)."""
    key = "from" if direction == "ingress" else "to"
    for rule in policy["spec"].get(direction, []):
        ports = rule.get("ports")
        if ports and not any(resolve_port(c, p.get("port")) == port or p.get("port") == port
                             for c in containers(target) for p in ports):
            continue
        peers = rule.get(key)
        if not peers:
            return True
        for peer in peers:
            if peer_pod is not None and set(peer) == {"podSelector"} and \
                    selects(peer["podSelector"], pod_labels(peer_pod)):
                return True
            if peer_pod is None and ("namespaceSelector" in peer or "ipBlock" in peer):
                return True
    return False


@params
def test_network_policies_let_traces_and_scrapes_through(rendered, overlay):
    """Whatever NetworkPolicies the stack has, the dynabatch pods reach Jaeger's OTLP/gRPC port,
    and something outside the namespace (Prometheus) reaches their metrics ports. The stack's
    only policy guards Redis ingress; a default-deny added later must keep these open."""
    objs = rendered(overlay)
    jaeger = by_component(objs, "jaeger")
    otlp = resolve_port(pod_spec(jaeger)["containers"][0], "otlp-grpc")
    policies = find(objs, "NetworkPolicy")
    for w, c in dynabatch_containers(objs):
        for p in policies:
            types = p["spec"].get("policyTypes", ["Ingress"])
            if "Egress" in types and selects(p["spec"]["podSelector"], pod_labels(w)):
                assert _policy_admits(p, "egress", jaeger, otlp, jaeger, objs), \
                    f"{p['metadata']['name']} blocks {component(w)} -> jaeger:{otlp}"
            if "Ingress" in types and selects(p["spec"]["podSelector"], pod_labels(jaeger)):
                assert _policy_admits(p, "ingress", w, otlp, jaeger, objs), \
                    f"{p['metadata']['name']} blocks {component(w)} -> jaeger:{otlp}"
            if "Ingress" in types and selects(p["spec"]["podSelector"], pod_labels(w)):
                assert _policy_admits(p, "ingress", None, resolve_port(c, "metrics"), w, objs), \
                    f"{p['metadata']['name']} blocks scrapes of {component(w)}"
