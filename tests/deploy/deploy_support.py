"""Paths and rendering for the deploy tests: `kubectl kustomize` where kubectl exists, else the
small renderer in kustomize_lite.py (test_deploy_render.py checks they agree)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

import kustomize_lite

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("dev", "gpu")


def kubectl_render(path: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path}:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render(path: Path) -> list[dict]:
    if shutil.which("kubectl"):
        return kubectl_render(path)
    return kustomize_lite.render(path)
