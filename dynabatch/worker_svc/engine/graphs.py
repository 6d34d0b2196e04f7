"""CUDA graphs for decode steps at bucketed batch sizes, captured once at start-up.

Each graph covers the whole step on the device: deriving slots and table rows from the staged
inputs (decode_inputs.py), the model forward with the paged attention, and the logits. A step
stages its inputs (one small host-to-device copy), replays the bucket's graph and leaves the
logits and their greedy tokens in the graph's static outputs (the tokens also where the next
step's inputs find them, decode_inputs.py); the caller's read of the tokens is the only sync.
"""
from __future__ import annotations

from typing import Callable

import torch

from dynabatch.worker_svc.engine.attention import PagedMetadata
from dynabatch.worker_svc.engine.decode_inputs import DecodeInputs
from dynabatch.worker_svc.engine.sampler import argmax_rows
from dynabatch.worker_svc.engine.sequence import Sequence

_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)

Forward = Callable[[torch.Tensor, torch.Tensor, PagedMetadata, None], torch.Tensor]


class DecodeGraphs:
    def __init__(self, forward: Forward, inputs: DecodeInputs, max_batch: int,
                 min_batch: int = 1, graphs: bool = True) -> None:
        """min_batch > 1 pads single-sequence steps (a compiled model specialises size 1).
        `graphs=False` runs the same padded steps without capturing (CPU tests); capture()
        then runs each bucket once (the compile warm-up)."""
        self.forward = forward
        self.inputs = inputs
        self.use_graphs = graphs
        self.max_batch = max_batch
        self.buckets = sorted({b for b in _BUCKETS if min_batch <= b < max_batch} | {max_batch})
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _step(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, pos, meta = self.inputs.device_meta(b)
        logits = self.forward(ids, pos, meta, None)
        greedy = argmax_rows(logits)
        self.inputs.keep_sampled(greedy)
        return logits, greedy

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.use_graphs:
            for b in sorted(self.buckets, reverse=True):
                self._step(b)
            return
        pool = None
        main = torch.cuda.current_stream()
        for b in sorted(self.buckets, reverse=True):
            side = torch.cuda.Stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):      # warm-up (Triton compile, cuBLAS handles)
                self._step(b)
            main.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits, greedy = self._step(b)
            pool = graph.pool()
            self._graphs[b] = (graph, logits, greedy)
        torch.cuda.synchronize()

    def run(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one token for each sequence; returns logits [n, V] and greedy tokens [n]."""
        n = len(seqs)
        b = next(x for x in self.buckets if x >= n)
        self.inputs.stage(seqs, b)
        if self.use_graphs:
            graph, logits, greedy = self._graphs[b]
            graph.replay()
        else:
            logits, greedy = self._step(b)
        return logits[:n], greedy[:n]
