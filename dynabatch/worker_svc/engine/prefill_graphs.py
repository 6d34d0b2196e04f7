"""CUDA graphs for prefill steps at bucketed token counts, captured once at start-up.

A prefill step's shape changes every step, so run as it comes its cost on a fast GPU is the
host's: ~17 compiled pieces and their launches (prefill.py), 7-8 ms for the 1B shape whatever
the prompt length (session 6, H100), while the GPU needs ~1-3 ms for a short prompt. Padded up
to a bucket (16 ... `max_tokens` tokens) a step has a fixed shape and replays one graph: the
step's tokens, positions and table rows, its chunks and their attention work items (tiles,
some cut into pieces of context: triton_prefill.py) go to the device in one copy, and the
graph derives the cache slots from the device block table (decode_inputs.py) and runs the
whole forward.

Padding stays harmless: padded tokens sit at position 0 of the null row, so they write the
scratch block only (kv_cache.py); no tile covers them; padded logits rows repeat row 0 and are
cut off. Steps larger than the biggest bucket run unpadded (runner.py), where the host's share
is small beside the device's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dynabatch.worker_svc.engine.attention import PagedMetadata, PagedPlan, kv_rows
from dynabatch.worker_svc.engine.decode_inputs import DecodeInputs, HostBuffers
from dynabatch.worker_svc.engine.scheduler import PrefillChunk

_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
MAX_TOKENS = _BUCKETS[-1]

Forward = Callable[[torch.Tensor, torch.Tensor, PagedMetadata, torch.Tensor], torch.Tensor]


def supported(heads: int, kv_heads: int, head_dim: int) -> bool:
    """The Triton kernel takes a power-of-two head_dim of at least 16, whole GQA groups."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and heads % kv_heads == 0


@dataclass(frozen=True)
class _Layout:
    """Where each input of a bucket lies in its flat int64 buffer."""
    tokens: int       # padded token count
    seqs: int         # padded chunk count
    items: int        # attention work items (triton_prefill.plan)
    merges: int       # split tiles

    @property
    def size(self) -> int:
        return 3 * self.tokens + self.seqs + 5 * self.items + 4 * self.merges + 4 * self.seqs

    def split(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(ids, pos, rows, keep, items [5, NI], merges [4, NM], seqs [4, S]) views."""
        t, s, n, k = self.tokens, self.seqs, self.items, self.merges
        ids, pos, rows, keep, items, merges, seqs = buf.split((t, t, t, s, 5 * n, 4 * k, 4 * s))
        return ids, pos, rows, keep, items.view(5, n), merges.view(4, k), seqs.view(4, s)


class PrefillGraphs:
    def __init__(self, forward: Forward, inputs: DecodeInputs, heads: int, max_seqs: int,
                 max_tokens: int, graphs: bool = True) -> None:
        """Buckets up to max_tokens (at most MAX_TOKENS); `heads`: the model's query heads.
        `graphs=False` runs the same padded steps without capturing (CPU tests: the kernel in
        Triton's interpreter)."""
        from dynabatch.worker_svc.engine import triton_prefill as tp   # triton: where it runs
        from dynabatch.worker_svc.engine.triton_decode import sm_count

        self._tp = tp
        self.forward = forward
        self.inputs = inputs
        self.use_graphs = graphs
        top = min(max_tokens, MAX_TOKENS)
        self.buckets = sorted({b for b in _BUCKETS if b < top} | {top})
        device = inputs.device
        _, _, _, kv_heads, _, dim = inputs.kv.data.shape
        self.split_target = tp.split_target(kv_heads, sm_count(device))
        slots = 2 * self.split_target
        self.layouts = {}
        for prev, b in zip([0] + self.buckets, self.buckets):
            seqs = min(b, max_seqs)
            # A bucket whose steps hold at least split_target tiles never splits one.
            s = slots if prev // tp.BLOCK_M + 1 < self.split_target else 0
            self.layouts[b] = _Layout(b, seqs, tp.max_tiles(b, seqs) + s, s // 2)
        self.scratch = tp.Scratch.make(slots, heads, kv_heads, dim, device)
        self._bufs = {b: torch.zeros(lay.size, dtype=torch.int64, device=device)
                      for b, lay in self.layouts.items()}
        self._host = HostBuffers(1, max(lay.size for lay in self.layouts.values()),
                                 pin=device.type == "cuda")
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def _step(self, b: int) -> torch.Tensor:
        ids, pos, rows, keep, items, merges, seqs = self.layouts[b].split(self._bufs[b])
        inputs = self.inputs
        blocks = inputs.table[rows, pos // inputs.block_size].long()
        offsets = pos % inputs.block_size
        kv = inputs.kv.data
        empty = blocks[:0]
        meta = PagedMetadata(kv=kv, write_blocks=blocks, write_offsets=offsets,
                             block_tables=inputs.table, context_lens=empty, decode=False,
                             write_rows=kv_rows(kv, blocks, offsets),
                             paged=PagedPlan(items, merges, seqs, inputs.table, self.scratch))
        return self.forward(ids, pos, meta, keep)

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.use_graphs:
            return
        pool = None
        main = torch.cuda.current_stream()
        for b in sorted(self.buckets, reverse=True):
            _, _, rows, *_ = self.layouts[b].split(self._bufs[b])
            rows.fill_(self.inputs.null_row)            # capture-time steps touch scratch only
            side = torch.cuda.Stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):               # warm-up: Triton, cuBLAS, compile
                self._step(b)
            main.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._step(b)
            pool = graph.pool()
            self._graphs[b] = (graph, logits)
        torch.cuda.synchronize()

    def run(self, chunks: list[PrefillChunk], keep: list[int]) -> torch.Tensor:
        """Runs the chunks (at most max_tokens tokens); returns logits [len(keep), V] of the
        packed rows `keep`."""
        q_lens = [c.end - c.start for c in chunks]
        t = sum(q_lens)
        b = next(x for x in self.buckets if x >= t)
        lay = self.layouts[b]
        host = self._host.next(lay.size)[0, : lay.size]
        ids, pos, rows, keep_h, items, merges, seqs = (a.numpy() for a in lay.split(host))
        ids[:t] = [tok for c in chunks for tok in c.seq.tokens[c.start:c.end]]
        pos[:t] = np.concatenate([np.arange(c.start, c.end) for c in chunks])
        rows[:t] = np.repeat([c.seq.row for c in chunks], q_lens)
        ids[t:], pos[t:], rows[t:] = 0, 0, self.inputs.null_row
        keep_h[: len(keep)], keep_h[len(keep):] = keep, 0
        ctx = [c.end for c in chunks]
        items[:], merges[:] = self._tp.plan(q_lens, ctx, lay.items, 2 * lay.merges,
                                            self.split_target)
        n = len(chunks)
        seqs[:, n:] = 0
        seqs[0, :n] = np.cumsum(q_lens) - q_lens
        seqs[1, :n] = q_lens
        seqs[2, :n] = ctx
        seqs[3, :n] = [c.seq.row for c in chunks]
        self.inputs.stage_table([c.seq for c in chunks])
        self._bufs[b].copy_(host, non_blocking=True)
        if b in self._graphs:
            graph, logits = self._graphs[b]
            graph.replay()
        else:
            logits = self._step(b)
        return logits[: len(keep)]
