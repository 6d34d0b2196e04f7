"""Generate the Python code for protos/ into dynabatch/v1/ (mirrors the proto package).

Usage: python tools/gen_protos.py          # regenerate in place
       python tools/gen_protos.py --check  # exit 1 if the committed code differs (CI)
"""
from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc
import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "dynabatch" / "v1"


def generate(dest: Path) -> None:
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={dest}",
            f"--pyi_out={dest}", f"--grpc_python_out={dest}", *files]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "dynabatch" / "v1"
        names = sorted(p.name for p in fresh.iterdir())
        if "--check" in sys.argv:
            stale = [n for n in names if not (OUT / n).exists() or not filecmp.cmp(fresh / n, OUT / n, shallow=False)]
            if stale:
                sys.exit(f"generated code is stale: {stale}; run python tools/gen_protos.py")
            print("generated code matches protos/")
            return
        OUT.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copy(fresh / n, OUT / n)
        print(f"wrote {len(names)} files to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
