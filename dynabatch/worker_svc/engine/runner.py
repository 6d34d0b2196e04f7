"""Runs the model on packed token batches over the paged cache (graph decode; prefill from
graphs at bucketed token counts, or unpadded above them)."""
from __future__ import annotations

import time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel

from dynabatch.worker_svc.engine.attention import PagedMetadata, kv_rows, varlen_plan
from dynabatch.worker_svc.engine.compiled import compiled_decode_forward, static_rope_table
from dynabatch.worker_svc.engine.decode_inputs import DecodeInputs
from dynabatch.worker_svc.engine.graphs import DecodeGraphs
from dynabatch.worker_svc.engine.kv_cache import KVCache, kv_shape
from dynabatch.worker_svc.engine.lean_decode import MAX_ROWS, LeanDecode, supports_lean_decode
from dynabatch.worker_svc.engine.prefill_graphs import PrefillGraphs, supported
from dynabatch.worker_svc.engine.prefill import LeanPrefill, supports_lean_prefill
from dynabatch.worker_svc.engine.scheduler import PrefillChunk
from dynabatch.worker_svc.engine.sequence import Sequence

# Prefill attends per sequence, with a new shape almost every call: cuDNN's attention builds an
# execution plan per shape (tens of ms each), so it is left out.
_PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ModelRunner:
    def __init__(self, model: PreTrainedModel, kv: KVCache, device: torch.device,
                 max_running: int, max_model_len: int, cuda_graphs: bool,
                 compile_decode: bool, compile_prefill: bool, prefill_graph_tokens: int,
                 gemv_rows: int = 0) -> None:
        """prefill_graph_tokens > 0 (with cuda_graphs, on CUDA): prefill steps of up to that
        many tokens replay CUDA graphs (prefill_graphs.py). gemv_rows (0..4) > 0: decode steps
        of at most that many rows run lean_decode.LeanDecode (the Triton GEMV with the norms,
        activation and residual adds fused in) where the layout allows it (`self.gemv_rows`
        says: 0 where it does not)."""
        if not 0 <= gemv_rows <= MAX_ROWS:
            raise ValueError(f"gemv_rows must be in 0..{MAX_ROWS}, got {gemv_rows}")
        self.model = model
        self.kv = kv
        self.device = device
        self.block_size = kv.block_size
        # Compiled decode: one dynamic-shape layer graph serves every batch size >= 2.
        self.compiled = compile_decode
        rope = (static_rope_table(model, max_model_len)
                if compile_decode or compile_prefill or gemv_rows else None)
        self.gemv_rows = gemv_rows if gemv_rows and supports_lean_decode(model, rope) else 0
        wide = compiled_decode_forward(model, rope) if compile_decode else self._forward
        self._decode_forward = wide
        if self.gemv_rows:
            lean = LeanDecode(model, rope)

            def forward(ids: torch.Tensor, pos: torch.Tensor, meta: PagedMetadata,
                        keep: None) -> torch.Tensor:
                """A Python check of the row count: each graph bucket captures one side."""
                return (lean if ids.shape[0] <= self.gemv_rows else wide)(ids, pos, meta, keep)

            self._decode_forward = forward
        # Flash attention's variable-length form serves prefill on CUDA in 16-bit.
        self._varlen = device.type == "cuda" and kv.data.dtype in (torch.float16, torch.bfloat16)
        # Prefill: the same math without the HF modules' host overhead where the layout allows
        # (compiled in pieces between the attention calls with `compile_prefill`).
        self._prefill_forward = (LeanPrefill(model, compile_prefill, rope)
                                 if supports_lean_prefill(model) else self._forward)
        self.compiled_prefill = compile_prefill and isinstance(self._prefill_forward, LeanPrefill)
        self.inputs = DecodeInputs(kv, device, max_running, max_running,
                                   -(-max_model_len // kv.block_size))
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and device.type == "cuda":
            self.graphs = DecodeGraphs(self._decode_forward, self.inputs, max_running,
                                       min_batch=self.min_decode_batch)
        self.prefill_graphs: PrefillGraphs | None = None
        heads = model.config.num_attention_heads
        if (self.graphs is not None and prefill_graph_tokens > 0
                and supported(heads, *kv_shape(model.config))):
            self.prefill_graphs = PrefillGraphs(self._prefill_forward, self.inputs, heads,
                                                max_running, prefill_graph_tokens)

    @property
    def min_decode_batch(self) -> int:
        """The smallest decode graph bucket: compiled layers specialise size 1, so batch 1 pads
        to 2 (one graph fewer to compile) unless the lean decode serves it."""
        return 2 if self.compiled and not self.gemv_rows else 1

    def capture(self) -> dict[str, float]:
        """Start-up work: compile the prefill pieces, capture the prefill and decode graphs;
        returns the seconds each phase that ran took."""
        steps = {}
        if isinstance(self._prefill_forward, LeanPrefill):
            steps["prefill_compile"] = lambda: self._prefill_forward.warm_up(self.device)
        if self.prefill_graphs is not None:
            steps["prefill_graphs"] = self.prefill_graphs.capture
        if self.graphs is not None:
            steps["decode_graphs"] = self.graphs.capture
        phases = {}
        for name, run in steps.items():
            t0 = time.perf_counter()
            run()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            phases[name] = time.perf_counter() - t0
        return phases

    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Runs the chunks; returns logits [n, V] for the chunks whose `wants_logits`."""
        q_lens = [c.end - c.start for c in chunks]
        ends = np.cumsum(q_lens)
        keep = [int(e) - 1 for c, e in zip(chunks, ends) if c.wants_logits]
        graphs = self.prefill_graphs
        if graphs is not None and ends[-1] <= graphs.max_tokens:
            return graphs.run(chunks, keep or [int(ends[-1]) - 1])[: len(keep)]
        bs = self.block_size
        tables = [np.asarray(c.seq.table.blocks, dtype=np.int64) for c in chunks]
        positions = [np.arange(c.start, c.end) for c in chunks]
        pos = np.concatenate(positions)
        meta = self._meta(decode=False)
        meta.write_blocks = self._tensor(np.concatenate(
            [t[p // bs] for t, p in zip(tables, positions)]))
        meta.write_offsets = self._tensor(pos % bs)
        meta.write_rows = kv_rows(self.kv.data, meta.write_blocks, meta.write_offsets)
        meta.query_lens = q_lens
        meta.context_lens_host = [c.end for c in chunks]
        if self._varlen:
            meta.varlen = varlen_plan([c.start for c in chunks], [c.end for c in chunks],
                                      tables, self.kv.data)
        else:
            meta.seq_blocks = [self._tensor(t[: -(-c.end // bs)]) for t, c in zip(tables, chunks)]
        ids = [t for c in chunks for t in c.seq.tokens[c.start:c.end]]
        with sdpa_kernel(_PREFILL_BACKENDS):
            logits = self._prefill_forward(self._tensor(ids), self._tensor(pos), meta,
                                           self._tensor(keep or [int(ends[-1]) - 1]))
        return logits[: len(keep)]

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token for each sequence (its last); returns logits [B, V] and, from a CUDA
        graph, their greedy tokens [B] (already kept for the next step), else None."""
        if self.graphs is not None:
            return self.graphs.run(seqs)
        self.inputs.stage(seqs, len(seqs))
        ids, pos, meta = self.inputs.device_meta(len(seqs))
        return self._decode_forward(ids, pos, meta, None), None

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

    def _tensor(self, values, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values), dtype=dtype).to(self.device, non_blocking=True)
