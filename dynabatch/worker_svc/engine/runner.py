"""Runs the model on packed token batches over the paged cache (eager prefill, graph decode)."""
from __future__ import annotations

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel

from dynabatch.worker_svc.engine.attention import PagedMetadata
from dynabatch.worker_svc.engine.compiled import compiled_decode_forward
from dynabatch.worker_svc.engine.decode_inputs import DecodeInputs
from dynabatch.worker_svc.engine.graphs import DecodeGraphs
from dynabatch.worker_svc.engine.kv_cache import KVCache
from dynabatch.worker_svc.engine.scheduler import PrefillChunk
from dynabatch.worker_svc.engine.sequence import Sequence

# Prefill attends per sequence, with a new shape almost every call: cuDNN's attention builds an
# execution plan per shape (tens of ms each), so it is left out.
_PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ModelRunner:
    def __init__(self, model: PreTrainedModel, kv: KVCache, device: torch.device,
                 max_running: int, max_model_len: int, cuda_graphs: bool,
                 compile_decode: bool) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.block_size = kv.block_size
        # Compiled decode: one dynamic-shape graph per layer serves every batch size >= 2.
        self.compiled = compile_decode
        self._decode_forward = (compiled_decode_forward(model) if compile_decode
                                else self._forward)
        self.inputs = DecodeInputs(kv, device, max_running, max_running,
                                   -(-max_model_len // kv.block_size))
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and device.type == "cuda":
            self.graphs = DecodeGraphs(self._decode_forward, self.inputs, max_running,
                                       min_batch=2 if compile_decode else 1)

    def capture(self) -> None:
        if self.graphs is not None:
            self.graphs.capture()

    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Runs the chunks; returns logits [n, V] for the chunks whose `wants_logits`."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        keep: list[int] = []
        meta = self._meta(decode=False)
        for c in chunks:
            ids.extend(c.seq.tokens[c.start:c.end])
            pos.extend(range(c.start, c.end))
            slots.extend(c.seq.table.slot(p, bs) for p in range(c.start, c.end))
            if c.wants_logits:
                keep.append(len(ids) - 1)
            meta.query_lens.append(c.end - c.start)
            meta.context_lens_host.append(c.end)
            meta.seq_blocks.append(self._blocks_tensor(c.seq, c.end))
        self._set_slots(meta, slots)
        with sdpa_kernel(_PREFILL_BACKENDS):
            logits = self._forward(self._tensor(ids), self._tensor(pos), meta,
                                   self._tensor(keep or [len(ids) - 1]))
        return logits[: len(keep)]

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each sequence (its last); returns logits [B, V]."""
        if self.graphs is not None:
            return self.graphs.run(seqs)
        self.inputs.stage(seqs, len(seqs))
        ids, pos, meta = self.inputs.device_meta(len(seqs))
        return self._decode_forward(ids, pos, meta, None)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, meta: PagedMetadata,
                 keep: torch.Tensor | None) -> torch.Tensor:
        """ids/pos [T] -> logits [T or len(keep), V]."""
        out = self.model(input_ids=ids[None], position_ids=pos[None], use_cache=False,
                         paged_metadata=meta, logits_to_keep=0 if keep is None else keep)
        return out.logits[0]

    def _meta(self, decode: bool) -> PagedMetadata:
        empty = torch.empty(0, dtype=torch.int32, device=self.device)
        return PagedMetadata(kv=self.kv.data, write_blocks=empty, write_offsets=empty,
                             block_tables=empty, context_lens=empty, decode=decode)

    def _set_slots(self, meta: PagedMetadata, slots: list[int]) -> None:
        s = np.asarray(slots, dtype=np.int64)
        meta.write_blocks = self._tensor(s // self.block_size)
        meta.write_offsets = self._tensor(s % self.block_size)

    def _blocks_tensor(self, seq: Sequence, ctx: int) -> torch.Tensor:
        n = -(-ctx // self.block_size)
        return self._tensor(seq.table.blocks[:n])

    def _tensor(self, values, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values), dtype=dtype).to(self.device, non_blocking=True)
