"""Print pyproject.toml's runtime requirements (core + one extra) minus named packages.

The Dockerfiles install these before copying the source, so the dependency layer is rebuilt only
when pyproject.toml changes, and the list lives in one place (pyproject.toml). Stdlib only: it
runs in the bare base image.

    python docker/requirements.py pyproject.toml --extra serve --exclude torch rich
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not match:
        raise ValueError(f"cannot parse requirement {req!r}")
    return canonical(match.group(1))


def requirements(pyproject: dict, extra: str | None, exclude: list[str]) -> list[str]:
    project = pyproject["project"]
    reqs = list(project.get("dependencies", []))
    if extra:
        reqs += project["optional-dependencies"][extra]
    drop = {canonical(n) for n in exclude}
    names = {requirement_name(r) for r in reqs}
    # An exclusion that matches nothing is a typo or a dependency that moved: fail the build.
    unknown = drop - names
    if unknown:
        raise ValueError(f"--exclude names no requirement of extra {extra!r}: {sorted(unknown)}")
    self_name = canonical(project["name"])
    out = []
    for req in reqs:
        name = requirement_name(req)
        if name in drop:
            continue
        if name == self_name:   # e.g. dynabatch[serve] inside another extra: not installable here
            raise ValueError(f"{req!r} refers to the project itself; pass that extra instead")
        out.append(req)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pyproject")
    p.add_argument("--extra", help="optional-dependencies group to include")
    p.add_argument("--exclude", nargs="*", default=[], help="project names to leave out")
    args = p.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        data = tomllib.load(f)
    print("\n".join(requirements(data, args.extra, args.exclude)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
