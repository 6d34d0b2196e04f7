"""Dockerfile lint (no Docker engine here to build them): pinned bases, non-root numeric user that
matches the manifests, dependency layers before the source, dependency lists that resolve against
pyproject.toml, caches on the volumes Kubernetes mounts writable."""
from __future__ import annotations

import os
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy_support import OVERLAYS, ROOT
from manifests import by_component, pod_spec

DOCKER = ROOT / "docker"
sys.path.insert(0, str(DOCKER))
import requirements  # noqa: E402  (docker/requirements.py)

# image -> (Dockerfile, build target, component in the manifests)
IMAGES = {
    "scheduler": ("scheduler.Dockerfile", None, "scheduler"),
    "worker-cpu": ("worker.Dockerfile", "cpu", "worker"),
    "worker-cuda": ("worker.Dockerfile", "cuda", "worker"),
}
# A full version (major.minor.patch), optionally a digest: never a floating tag like 3.11-slim.
PINNED_TAG = re.compile(r"^[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?$")


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, each with its (INSTRUCTION, arguments) in order."""
    text = re.sub(r"\\\n", " ", path.read_text())           # join continuation lines
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr, rest = instr.upper(), rest.strip()
        if instr == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(name, parts[0]))
        elif instr == "ARG" and not stages:
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append((instr, rest))
    return args, stages


def chain(stages: list[Stage], target: str | None) -> list[Stage]:
    """The stages a build of `target` runs through, base first (the last stage by default)."""
    by_name = {s.name: s for s in stages if s.name}
    stage = by_name[target] if target else stages[-1]
    out = [stage]
    while stage.base in by_name:
        stage = by_name[stage.base]
        out.insert(0, stage)
    return out


def copied_from(stage: Stage) -> list[str]:
    return [re.search(r"--from=(\S+)", rest).group(1) for instr, rest in stage.instructions
            if instr == "COPY" and "--from=" in rest]


def resolve_base(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


@pytest.mark.parametrize("dockerfile", ["scheduler.Dockerfile", "worker.Dockerfile"])
def test_bases_are_pinned_and_no_broad_copies(dockerfile):
    args, stages = parse_dockerfile(DOCKER / dockerfile)
    names = {s.name for s in stages}
    for stage in stages:
        if stage.base in names:
            continue
        base = resolve_base(stage.base, args)
        assert PINNED_TAG.match(base) and ":latest" not in base, f"unpinned base {base}"
        for instr, rest in stage.instructions:
            assert instr != "ADD", "use COPY (ADD fetches URLs and unpacks archives)"
            if instr == "COPY" and "--from=" not in rest:
                sources = shlex.split(rest)[:-1]
                assert "." not in sources and "./" not in sources, "COPY of the whole context"
    assert (DOCKER / f"{dockerfile}.dockerignore").is_file()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_third_party_images_are_pinned(rendered, overlay):
    for obj in rendered(overlay):
        for c in (obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])):
            if "dynabatch" not in c["image"]:
                assert PINNED_TAG.match(c["image"]), c["image"]


@pytest.mark.parametrize("image", IMAGES)
def test_final_stage_runs_non_root_as_the_manifests_expect(image, rendered):
    dockerfile, target, comp = IMAGES[image]
    _, stages = parse_dockerfile(DOCKER / dockerfile)
    instrs = [i for s in chain(stages, target) for i in s.instructions]
    users = [rest for instr, rest in instrs if instr == "USER"]
    assert users, "no USER: the image runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "a numeric non-root uid lets runAsNonRoot verify it"
    entry = [rest for instr, rest in instrs if instr == "ENTRYPOINT"][-1]
    assert entry == '["python", "-m", "dynabatch.cli"]'
    for overlay in OVERLAYS:
        pod = pod_spec(by_component(rendered(overlay), comp))
        assert pod["securityContext"]["runAsUser"] == int(uid), overlay
        assert pod["containers"][0]["args"][0] == comp


@pytest.mark.parametrize("image", IMAGES)
def test_exposed_ports_are_the_containers_ports(image, rendered):
    """EXPOSE (documentation for `docker run -P` and readers) lists the ports the manifests
    declare for that image's container: the gRPC/health port and /metrics."""
    dockerfile, target, comp = IMAGES[image]
    _, stages = parse_dockerfile(DOCKER / dockerfile)
    exposed = {int(p.split("/")[0]) for s in chain(stages, target) for instr, rest in s.instructions
               if instr == "EXPOSE" for p in rest.split()}
    for overlay in OVERLAYS:
        c = pod_spec(by_component(rendered(overlay), comp))["containers"][0]
        assert exposed == {p["containerPort"] for p in c["ports"]}, f"{image} vs {overlay}"


@pytest.mark.parametrize("image", IMAGES)
def test_dependencies_install_before_the_source(image):
    """Layer order: pyproject.toml → dependency install → source, so a code change reuses the
    (large) dependency layers; the source is copied only into the final stage."""
    dockerfile, target, _ = IMAGES[image]
    args, stages = parse_dockerfile(DOCKER / dockerfile)
    final = chain(stages, target)
    by_name = {s.name: s for s in stages}
    dep_stages = [by_name[n] for s in final for n in copied_from(s)]
    assert dep_stages, "dependencies should come from a builder stage"
    for dep in dep_stages:
        instrs = dep.instructions
        copy_at = next(i for i, (ins, rest) in enumerate(instrs) if ins == "COPY" and "pyproject.toml" in rest)
        install_at = next(i for i, (ins, rest) in enumerate(instrs) if ins == "RUN" and "requirements.py" in rest)
        assert copy_at < install_at
        assert not any("dynabatch/" in rest for ins, rest in instrs if ins == "COPY"), \
            f"stage {dep.name} copies the source: a code change would reinstall everything"
    last = final[-1].instructions
    source_at = [i for i, (ins, rest) in enumerate(last) if ins == "COPY" and "dynabatch/" in rest]
    deps_at = [i for i, (ins, rest) in enumerate(last) if ins == "COPY" and "--from=" in rest]
    assert source_at and deps_at and max(deps_at) < min(source_at)
    assert all(ins != "RUN" for ins, _ in last[min(source_at):]), "nothing may run after the source"


@pytest.mark.parametrize("image", IMAGES)
def test_requirement_lists_resolve_against_pyproject(image):
    """Each `requirements.py` call in the recipe works on today's pyproject.toml; the scheduler
    image has no torch, the workers do (installed pinned, before the rest)."""
    dockerfile, target, _ = IMAGES[image]
    args, stages = parse_dockerfile(DOCKER / dockerfile)
    by_name = {s.name: s for s in stages}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runs = [rest for s in chain(stages, target) for n in copied_from(s)
            for ins, rest in by_name[n].instructions if ins == "RUN"]
    calls = [r for r in runs if "requirements.py" in r]
    assert len(calls) == 1
    argv = shlex.split(calls[0].split("requirements.py", 1)[1].split(">", 1)[0])
    extra = argv[argv.index("--extra") + 1]
    exclude = argv[argv.index("--exclude") + 1:]
    reqs = requirements.requirements(pyproject, extra, exclude)   # raises on stale exclusions
    names = {requirements.requirement_name(r) for r in reqs}
    assert {"grpcio", "redis", "transformers"} <= names
    torch_installs = [r for r in runs if re.search(r"pip install torch==\$\{TORCH_VERSION\}", r)]
    if image == "scheduler":
        assert "torch" in exclude and not torch_installs
    else:
        assert len(torch_installs) == 1 and runs.index(torch_installs[0]) < runs.index(calls[0])


def test_requirements_script_rejects_stale_exclusions():
    pyproject = {"project": {"name": "p", "dependencies": ["a>=1"],
                             "optional-dependencies": {"x": ["B_c[extra]>=2", "d"]}}}
    assert requirements.requirements(pyproject, "x", ["b-c"]) == ["a>=1", "d"]
    with pytest.raises(ValueError):
        requirements.requirements(pyproject, "x", ["nonexistent"])


@pytest.mark.parametrize("image", IMAGES)
def test_caches_live_on_writable_volumes(image, rendered):
    """With readOnlyRootFilesystem every cache dir the image points at must be on a mount."""
    dockerfile, target, comp = IMAGES[image]
    _, stages = parse_dockerfile(DOCKER / dockerfile)
    env_text = " ".join(rest for s in chain(stages, target) for ins, rest in s.instructions
                        if ins == "ENV")
    cache_dirs = [v for k, v in re.findall(r"(\w+)=(\S+)", env_text)
                  if k.endswith(("_HOME", "_CACHE_DIR"))]
    assert cache_dirs
    for overlay in OVERLAYS:
        pod = pod_spec(by_component(rendered(overlay), comp))
        c = pod["containers"][0]
        assert c["securityContext"]["readOnlyRootFilesystem"]
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        mounts = [m["mountPath"] for m in c["volumeMounts"] if m["name"] in empty_dirs]
        for d in cache_dirs:
            assert any(Path(d).is_relative_to(m) for m in mounts), f"{overlay} {comp}: {d}"


SCHEDULER_WITHOUT_TORCH = r'''
import asyncio, sys
try:
    import torch
    sys.exit("torch is importable: the check is void")
except ImportError:
    pass
from dynabatch.cli import build_parser
from dynabatch.scheduler_svc.server import SchedulerConfig, SchedulerServer
from dynabatch.wire.models import load_tokenizer
from dynabatch.wire.queue import connect
build_parser().parse_args(["scheduler"])
assert load_tokenizer("tiny-random-llama").encode("hi")
async def main():
    server = SchedulerServer(connect(None), SchedulerConfig(listen="127.0.0.1:0"))
    await server.start()
    await server.stop(0)
asyncio.run(main())
'''


def test_scheduler_runs_without_what_its_image_leaves_out(tmp_path):
    """The scheduler image installs no torch and no matplotlib: the scheduler must start without
    them. Run it on a view of site-packages with those (and torch's own dependencies) hidden."""
    import site
    import subprocess
    _, stages = parse_dockerfile(DOCKER / "scheduler.Dockerfile")
    run = next(rest for s in stages for ins, rest in s.instructions
               if ins == "RUN" and "requirements.py" in rest)
    assert {"torch", "matplotlib"} <= set(shlex.split(run.split("--exclude", 1)[1].split(">")[0]))
    hidden = re.compile(r"^(torch|torchgen|functorch|triton|nvidia|matplotlib)([-_.].*)?$", re.I)
    view = tmp_path / "site-packages"
    view.mkdir()
    for sp in site.getsitepackages():
        for entry in Path(sp).iterdir() if Path(sp).is_dir() else []:
            if not hidden.match(entry.name) and not entry.name.endswith(".pth") \
                    and not (view / entry.name).exists():
                (view / entry.name).symlink_to(entry)
    # -S: no site-packages of our own, only the filtered view (and the source tree).
    out = subprocess.run([sys.executable, "-S", "-c", SCHEDULER_WITHOUT_TORCH],
                         env={"PYTHONPATH": f"{ROOT}{os.pathsep}{view}", "PATH": os.environ["PATH"],
                              "HF_HOME": str(tmp_path / "hf")},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
