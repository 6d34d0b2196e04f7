"""tools/profile_decode.py runs end to end on the tiny model (CPU) and profiles decode steps."""
from __future__ import annotations

import importlib.util
from pathlib import Path

TOOL = Path(__file__).parents[2] / "tools" / "profile_decode.py"


def test_profile_decode_tool(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("profile_decode", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu", "--batches", "1,3", "--prompt", "8", "--steps", "3",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "batch 1: 3 decode steps profiled" in out and "batch 3: 3 decode steps" in out
    assert "dynabatch::paged_decode" in out           # our attention op shows in the table
    assert (tmp_path / "decode_b3.json").stat().st_size > 0
