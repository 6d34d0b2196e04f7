"""CUDA graphs for decode steps at bucketed batch sizes, captured once at start-up.

Every graph reads the same static device buffers; a step fills a pinned host staging buffer,
copies it over with one transfer (plus one for the live columns of the block table), pads the
batch up to the bucket with rows that point at the scratch block, and replays. Nothing in the
replay waits on the host; the caller's read of the sampled tokens is the step's only sync.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from dynabatch.worker_svc.engine.attention import PagedMetadata
from dynabatch.worker_svc.engine.kv_cache import NULL_BLOCK, KVCache
from dynabatch.worker_svc.engine.sequence import Sequence

_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)

Forward = Callable[[torch.Tensor, torch.Tensor, PagedMetadata, None], torch.Tensor]


class DecodeGraphs:
    # Rows of the packed int64 step buffer.
    IDS, POS, BLK, OFF, CTX = range(5)

    def __init__(self, forward: Forward, kv: KVCache, device: torch.device, max_batch: int,
                 table_width: int, min_batch: int = 1) -> None:
        """min_batch > 1 pads single-sequence steps (a compiled model specialises size 1)."""
        self.forward = forward
        self.kv = kv
        self.block_size = kv.block_size
        self.max_batch = max_batch
        self.buckets = sorted({b for b in _BUCKETS if min_batch <= b < max_batch} | {max_batch})
        self.host = torch.zeros((5, max_batch), dtype=torch.int64, pin_memory=True)
        self.host_np = self.host.numpy()
        self.step_buf = torch.zeros((5, max_batch), dtype=torch.int64, device=device)
        self.step_buf[self.CTX] = 1
        self.table = torch.full((max_batch, table_width), NULL_BLOCK, dtype=torch.int32,
                                device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _meta(self, b: int) -> PagedMetadata:
        buf = self.step_buf
        return PagedMetadata(kv=self.kv.data, write_blocks=buf[self.BLK, :b],
                             write_offsets=buf[self.OFF, :b], block_tables=self.table[:b],
                             context_lens=buf[self.CTX, :b], decode=True)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        main = torch.cuda.current_stream()
        for b in sorted(self.buckets, reverse=True):
            args = (self.step_buf[self.IDS, :b], self.step_buf[self.POS, :b], self._meta(b), None)
            side = torch.cuda.Stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):      # warm-up (Triton compile, cuBLAS handles)
                self.forward(*args)
            main.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.forward(*args)
            pool = graph.pool()
            self._graphs[b] = (graph, logits)
        torch.cuda.synchronize()

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Decode one token for each sequence; returns logits [len(seqs), V]."""
        n = len(seqs)
        b = next(x for x in self.buckets if x >= n)
        bs = self.block_size
        h = self.host_np
        h[:, n:b] = 0
        h[self.CTX, n:b] = 1
        pos = [s.num_computed for s in seqs]
        h[self.IDS, :n] = [s.tokens[-1] for s in seqs]
        h[self.POS, :n] = pos
        slots = np.asarray([s.table.blocks[p // bs] * bs + p % bs for s, p in zip(seqs, pos)])
        h[self.BLK, :n] = slots // bs
        h[self.OFF, :n] = slots % bs
        h[self.CTX, :n] = h[self.POS, :n] + 1
        width = max(len(s.table.blocks) for s in seqs)
        table = np.zeros((b, width), dtype=np.int32)
        for i, s in enumerate(seqs):
            table[i, : len(s.table.blocks)] = s.table.blocks
        self.step_buf[:, :b].copy_(self.host[:, :b], non_blocking=True)
        self.table[:b, :width].copy_(torch.from_numpy(table), non_blocking=False)
        graph, logits = self._graphs[b]
        graph.replay()
        return logits[:n]
