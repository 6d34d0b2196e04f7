"""Queries over rendered manifests, shared by the cross-reference tests."""
from __future__ import annotations

import base64
import re

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) or a Service's plain map."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        ok = {"In": lambda: value in expr["values"],
              "NotIn": lambda: value not in expr["values"],
              "Exists": lambda: expr["key"] in labels,
              "DoesNotExist": lambda: expr["key"] not in labels}[op]()
        if not ok:
            return False
    return True


def component(workload: dict) -> str:
    return pod_labels(workload)["app.kubernetes.io/component"]


def by_component(objs: list[dict], name: str) -> dict:
    found = [w for w in workloads(objs) if component(w) == name]
    assert len(found) == 1, f"{len(found)} workloads of component {name}"
    return found[0]


def resolve_port(container: dict, port) -> int | None:
    """A probe/Service port (number or name) as the container's port number, None if absent."""
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    return None


def probe_ports(container: dict) -> list:
    ports = []
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container.get(probe)
        if not spec:
            continue
        for handler in ("grpc", "httpGet", "tcpSocket"):
            if handler in spec:
                ports.append((probe, handler, spec[handler]["port"]))
    return ports


def env_names(container: dict) -> list[str]:
    return [e["name"] for e in container.get("env", [])]


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion with `env` standing for the container's variables."""
    return VAR_REF.sub(lambda m: env[m.group(1)], value)


def listen_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def container_env(objs: list[dict], container: dict, override: dict | None = None) -> dict:
    """The container's env vars as the process sees them (secrets decoded where rendered)."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if override and e["name"] in override:
            env[e["name"]] = override[e["name"]]
        elif "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "configMapKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = one(objs, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            found = find(objs, "Secret", ref["name"])
            env[e["name"]] = (base64.b64decode(found[0]["data"][ref["key"]]).decode() if found
                              else "out-of-band-secret")
        elif "fieldRef" in e["valueFrom"]:
            env[e["name"]] = "pod-" + e["valueFrom"]["fieldRef"]["fieldPath"].replace(".", "-")
        else:
            raise AssertionError(f"unhandled env source {e}")
    return env
