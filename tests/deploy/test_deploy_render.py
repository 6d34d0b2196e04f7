"""Each overlay renders, passes kubernetes-validate --strict, and the fallback renderer matches
kubectl's output."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import kustomize_lite
from deploy_support import DEPLOY, OVERLAYS, kubectl_render

# The oldest Kubernetes the manifests target (native gRPC probes: 1.27; preStop `sleep`: 1.30)
# and the newest schemas kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", None)
KINDS = {"Namespace", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "NetworkPolicy"}


def key(obj: dict) -> tuple:
    return obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(rendered, overlay):
    objs = rendered(overlay)
    assert KINDS <= {o["kind"] for o in objs}
    assert len({key(o) for o in objs}) == len(objs), "duplicate objects"
    namespaces = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
    assert len(namespaces) == 1
    for o in objs:
        if o["kind"] != "Namespace" and o["kind"] != "PersistentVolume":
            assert o["metadata"].get("namespace") in namespaces, key(o)


def _validator() -> list[str]:
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("kubernetes-validate is missing (pyproject's dev extra lists it)")
        pytest.skip("kubernetes-validate not installed")
    exe = shutil.which("kubernetes-validate", path=os.path.dirname(sys.executable)) or \
        shutil.which("kubernetes-validate")
    assert exe, "kubernetes_validate imports but its command is not on PATH"
    return [exe]


def _validate(paths: list[Path], version: str | None) -> subprocess.CompletedProcess:
    cmd = _validator() + ["--strict", "--quiet"] + (["-k", version] if version else [])
    return subprocess.run(cmd + [str(p) for p in paths], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_kubernetes_validate_strict(rendered, tmp_path, version):
    paths = []
    for overlay in OVERLAYS:
        p = tmp_path / f"{overlay}.yaml"
        p.write_text(yaml.safe_dump_all(rendered(overlay), sort_keys=False))
        paths.append(p)
    out = _validate(paths, version)
    assert out.returncode == 0, out.stdout + out.stderr


def test_kubernetes_validate_strict_rejects_unknown_fields(tmp_path):
    """The validator is live: a misspelt field in a container fails --strict."""
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": [{"name": "c", "image": "i", "readinessProbes": {}}]}}
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    assert _validate([p], None).returncode != 0


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")
@pytest.mark.parametrize("path", ["base", "overlays/dev", "overlays/gpu"])
def test_fallback_renderer_matches_kubectl(path):
    want = {key(o): o for o in kubectl_render(DEPLOY / path)}
    got = {key(o): o for o in kustomize_lite.render(DEPLOY / path)}
    assert set(got) == set(want)
    for k in want:
        assert got[k] == want[k], k


# --- the fallback renderer on its own (runs without kubectl)

def test_content_hash_matches_kustomize():
    # Expected values from kustomize's api/hasher tests and from kubectl kustomize v5.5.
    assert kustomize_lite.content_hash({"kind": "ConfigMap", "data": {"one": ""}}) == "9g67k2htb6"
    assert kustomize_lite.content_hash({"kind": "ConfigMap", "data": {"k": "v"}}) == "bdg947hgcc"
    assert kustomize_lite.content_hash(
        {"kind": "Secret", "type": "Opaque", "data": {"k": "dg=="}}) == "ftgtgc4t9f"


def _kustomization(tmp_path: Path, kustomization: dict, files: dict[str, object]) -> Path:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    for name, docs in files.items():
        (tmp_path / name).write_text(yaml.safe_dump_all(docs if isinstance(docs, list) else [docs]))
    return tmp_path


DEPLOYMENT = {
    "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
    "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
        "metadata": {"labels": {"a": "b"}},
        "spec": {"tolerations": [{"key": "t", "operator": "Exists"}], "containers": [{
            "name": "c", "image": "reg.local:5000/img:1", "args": ["x", "y"],
            "env": [{"name": "E", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "K"}}}],
            "resources": {"limits": {"cpu": "1", "nvidia.com/gpu": 1}},
            "volumeMounts": [{"name": "v", "mountPath": "/v"}]}]}}}}


def test_renderer_generators_patches_images_namespace(tmp_path):
    patch = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
             "spec": {"template": {"spec": {"tolerations": None, "containers": [{
                 "name": "c", "args": ["z"], "resources": {"limits": {"nvidia.com/gpu": None}},
                 "volumeMounts": [{"name": "w", "mountPath": "/w"}]}]}}}}
    path = _kustomization(tmp_path, {
        "namespace": "ns", "resources": ["d.yaml"], "patches": [{"path": "p.yaml"}],
        "images": [{"name": "reg.local:5000/img", "newName": "other/img", "newTag": "2"}],
        "configMapGenerator": [{"name": "cfg", "literals": ["K=v"]}]},
        {"d.yaml": DEPLOYMENT, "p.yaml": patch})
    objs = {o["kind"]: o for o in kustomize_lite.render(path)}
    cm, dep = objs["ConfigMap"], objs["Deployment"]
    assert cm["metadata"] == {"name": "cfg-" + kustomize_lite.content_hash(cm), "namespace": "ns"}
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert dep["metadata"]["namespace"] == "ns"
    assert "tolerations" not in pod
    assert c["args"] == ["z"]                                        # scalar lists: replaced
    assert c["resources"] == {"limits": {"cpu": "1"}}                 # null: deleted
    assert [m["name"] for m in c["volumeMounts"]] == ["w", "v"]      # keyed lists: merged
    assert c["image"] == "other/img:2"
    assert c["env"][0]["valueFrom"]["configMapKeyRef"]["name"] == cm["metadata"]["name"]
    if shutil.which("kubectl"):                                      # and kustomize agrees
        assert sorted(kubectl_render(path), key=key) == sorted(kustomize_lite.render(path), key=key)


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    path = _kustomization(tmp_path, {"resources": ["d.yaml"], "commonLabels": {"x": "y"}},
                          {"d.yaml": DEPLOYMENT})
    with pytest.raises(kustomize_lite.Unsupported):
        kustomize_lite.render(path)
    path = _kustomization(tmp_path, {"resources": ["d.yaml"], "patches": [
        {"path": "p.yaml", "target": {"kind": "Deployment"}}]}, {"d.yaml": DEPLOYMENT, "p.yaml": {}})
    with pytest.raises(kustomize_lite.Unsupported):
        kustomize_lite.render(path)
