"""A small kustomize renderer for the subset deploy/ uses, for machines without kubectl.

Where kubectl exists the tests render with `kubectl kustomize` and also check that this renderer
gives the same objects (test_render.py), so the two cannot drift apart unnoticed. Anything outside
the subset raises `Unsupported` rather than rendering something kustomize would not.

Subset: resources (files and directories), namespace, images (newName/newTag/digest),
configMapGenerator and secretGenerator (literals, behavior create/merge/replace, kustomize's
content-hash name suffix and the references to it), patches (strategic merge, by kind + name).
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "configMapGenerator",
                  "secretGenerator", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass", "IngressClass",
                  "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "APIService"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}

# Strategic-merge keys of the lists the patches touch (from the Kubernetes API's
# x-kubernetes-patch-merge-key); every other list is replaced whole, as SMP does.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "envFrom": None,
              "volumes": "name", "volumeMounts": "mountPath", "imagePullSecrets": "name"}


class Unsupported(ValueError):
    """The kustomization uses something this renderer does not implement."""


def render(path: str | Path) -> list[dict]:
    """The objects `kubectl kustomize path` prints (order aside)."""
    objs, generated = _build(Path(path))
    _apply_name_hashes(objs, generated)
    return objs


# --- building one kustomization

def _load_kustomization(directory: Path) -> dict:
    for name in KUSTOMIZATION_FILES:
        f = directory / name
        if f.is_file():
            k = yaml.safe_load(f.read_text()) or {}
            extra = set(k) - SUPPORTED_KEYS
            if extra:
                raise Unsupported(f"{f}: kustomization keys {sorted(extra)}")
            return k
    raise FileNotFoundError(f"no kustomization file in {directory}")


def _build(directory: Path) -> tuple[list[dict], set[tuple[str, str]]]:
    """Objects of one kustomization, and the (kind, name) of generated ones (hashed at the end)."""
    k = _load_kustomization(directory)
    objs: list[dict] = []
    generated: set[tuple[str, str]] = set()
    for entry in k.get("resources", []):
        p = directory / entry
        if p.is_dir():
            sub, sub_generated = _build(p)
            objs += sub
            generated |= sub_generated
        else:
            objs += [d for d in yaml.safe_load_all(p.read_text()) if d]
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for spec in k.get(key, []):
            _generate(objs, generated, kind, spec)
    for patch in k.get("patches", []):
        _patch(objs, directory, patch)
    for image in k.get("images", []):
        _set_image(objs, image)
    if "namespace" in k:
        _set_namespace(objs, k["namespace"])
    return objs, generated


def _generate(objs: list[dict], generated: set, kind: str, spec: dict) -> None:
    allowed = {"name", "literals", "behavior"} | ({"type"} if kind == "Secret" else set())
    if set(spec) - allowed:
        raise Unsupported(f"{kind} generator keys {sorted(set(spec) - allowed)}")
    data = {}
    for literal in spec.get("literals", []):
        key, sep, value = literal.partition("=")
        if not sep:
            raise ValueError(f"literal {literal!r} is not KEY=VALUE")
        data[key] = value
    if kind == "Secret":
        data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    name, behavior = spec["name"], spec.get("behavior", "create")
    existing = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    if behavior == "create":
        if existing:
            raise ValueError(f"{kind}/{name} already exists (use behavior: merge or replace)")
        obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}, "data": data}
        if kind == "Secret":
            obj["type"] = spec.get("type", "Opaque")
        objs.append(obj)
        generated.add((kind, name))
    elif behavior in ("merge", "replace"):
        if len(existing) != 1:
            raise ValueError(f"{behavior}: no {kind}/{name} to {behavior} with")
        target = existing[0]
        target["data"] = {**target.get("data", {}), **data} if behavior == "merge" else data
    else:
        raise Unsupported(f"generator behavior {behavior!r}")


# --- kustomize's name hash: sha256 of a JSON encoding, first 10 hex digits with some letters
# swapped (api/hasher). kustomize looks the name up with a path it cannot resolve, so the name
# it hashes is always "" (kept here: the point is to print what kustomize prints).

def content_hash(obj: dict) -> str:
    if obj["kind"] == "ConfigMap":
        m = {"kind": "ConfigMap", "name": "", "data": obj.get("data") or ""}
        if obj.get("binaryData"):
            m["binaryData"] = obj["binaryData"]
    elif obj["kind"] == "Secret":
        m = {"kind": "Secret", "name": "", "type": obj.get("type", ""),
             "data": obj.get("data") or ""}
    else:
        raise Unsupported(f"hash of {obj['kind']}")
    encoded = json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # Go's encoding/json escapes these three.
    encoded = encoded.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _apply_name_hashes(objs: list[dict], generated: set[tuple[str, str]]) -> None:
    renames: dict[tuple[str, str], str] = {}
    for obj in objs:
        key = (obj["kind"], obj["metadata"]["name"])
        if key in generated:
            new = f"{key[1]}-{content_hash(obj)}"
            renames[key] = new
            obj["metadata"]["name"] = new
    for obj in objs:
        spec = _pod_spec(obj)
        if spec is not None:
            _rename_refs(spec, renames)


def _rename_refs(spec: dict, renames: dict[tuple[str, str], str]) -> None:
    def fix(ref: dict | None, kind: str, field: str = "name") -> None:
        if ref and (kind, ref.get(field)) in renames:
            ref[field] = renames[(kind, ref[field])]

    for c in spec.get("containers", []) + spec.get("initContainers", []):
        for env in c.get("env", []):
            source = env.get("valueFrom", {})
            fix(source.get("configMapKeyRef"), "ConfigMap")
            fix(source.get("secretKeyRef"), "Secret")
        for env_from in c.get("envFrom", []):
            fix(env_from.get("configMapRef"), "ConfigMap")
            fix(env_from.get("secretRef"), "Secret")
    for vol in spec.get("volumes", []):
        fix(vol.get("configMap"), "ConfigMap")
        fix(vol.get("secret"), "Secret", "secretName")
        for source in vol.get("projected", {}).get("sources", []):
            fix(source.get("configMap"), "ConfigMap")
            fix(source.get("secret"), "Secret")


# --- transformers

def _pod_spec(obj: dict) -> dict | None:
    if obj["kind"] in POD_TEMPLATE_KINDS:
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] == "Pod":
        return obj["spec"]
    return None


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """name, tag, digest (a registry host with a port keeps its colon in the name)."""
    rest, _, digest = image.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1:], digest or None
    return rest, None, digest or None


def _set_image(objs: list[dict], image: dict) -> None:
    if set(image) - {"name", "newName", "newTag", "digest"}:
        raise Unsupported(f"images keys {sorted(image)}")
    for obj in objs:
        spec = _pod_spec(obj)
        for c in (spec or {}).get("containers", []) + (spec or {}).get("initContainers", []):
            name, tag, digest = split_image(c["image"])
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            if "newTag" in image:
                tag, digest = str(image["newTag"]), None
            if "digest" in image:
                tag, digest = None, image["digest"]
            c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _set_namespace(objs: list[dict], namespace: str) -> None:
    for obj in objs:
        if obj["kind"] == "Namespace":
            # kustomize renames Namespace objects to the namespace; this renderer does not.
            if obj["metadata"]["name"] != namespace:
                raise Unsupported(f"Namespace {obj['metadata']['name']} under namespace: {namespace}")
        elif obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace


# --- strategic merge patches

def _patch(objs: list[dict], directory: Path, entry: dict) -> None:
    if set(entry) - {"path", "patch"}:
        raise Unsupported(f"patch keys {sorted(entry)} (only path/patch, no target)")
    text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        if isinstance(doc, list):
            raise Unsupported("JSON 6902 patches")
        matches = [o for o in objs if o["kind"] == doc["kind"]
                   and o["metadata"]["name"] == doc["metadata"]["name"]]
        if len(matches) != 1:
            raise ValueError(f"patch matches {len(matches)} objects: "
                             f"{doc['kind']}/{doc['metadata']['name']}")
        merged = strategic_merge(matches[0], doc)
        matches[0].clear()
        matches[0].update(merged)


def strategic_merge(base, patch, field: str | None = None):
    """Strategic merge of `patch` into `base` (a new object): maps merge, null deletes, lists
    with a merge key merge item by item (new items first, as kustomize orders them), other lists
    are replaced."""
    if isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise Unsupported(f"patch directives {[k for k in patch if k.startswith('$')]}")
        out = copy.deepcopy(base) if isinstance(base, dict) else {}
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = strategic_merge(None, value, key)
        return out
    if isinstance(patch, list) and isinstance(base, list):
        key = _merge_key(field, base + patch)
        if key is None:
            return copy.deepcopy(patch)
        out, new = copy.deepcopy(base), []
        for item in patch:
            same = [i for i, b in enumerate(out) if b.get(key) == item.get(key)]
            if same:
                out[same[0]] = strategic_merge(out[same[0]], item, None)
            else:
                new.append(strategic_merge(None, item, None))
        return new + out
    if isinstance(patch, list):
        return [strategic_merge(None, i, None) for i in patch]
    return patch


def _merge_key(field: str | None, items: list) -> str | None:
    if field == "ports":   # container ports merge on containerPort, Service ports on port
        return "containerPort" if all("containerPort" in i for i in items) else "port"
    if field in MERGE_KEYS and MERGE_KEYS[field] is None:
        raise Unsupported(f"strategic merge of {field}")
    return MERGE_KEYS.get(field)
