"""The compiled decode forward's rotary table gives the rotary module's own cos/sin."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from dynabatch.worker_svc.engine.compiled import rope_table


def test_rope_table_equals_the_rotary_module(llama_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.bfloat16)
    base = model.base_model
    table = rope_table(model, 300)
    pos = torch.tensor([[0, 1, 17, 255, 299, 5]])
    hidden = torch.zeros(1, pos.shape[1], model.config.hidden_size, dtype=torch.bfloat16)
    cos, sin = base.rotary_emb(hidden, position_ids=pos)
    got_cos, got_sin = table[pos[0]][None].unbind(2)
    assert table.shape == (300, 2, cos.shape[-1]) and table.dtype == cos.dtype
    assert torch.equal(got_cos, cos) and torch.equal(got_sin, sin)
