"""Decode-step inputs with minimal host work: a device-resident block table, three ints per row.

Every running sequence owns a row of a device block table for as long as it runs (the
scheduler hands rows out). A step sends only (token id, position, row) per sequence plus the
table entries added since the sequence was last staged; slots, context lengths and the batch's
table rows are derived on the device, inside the CUDA graph when one is used. Row `max_rows`
is all zeros: padded batch rows point at it, so they read and write the scratch block only.

A step may be staged while the previous one still runs (engine.py overlaps them). Its token id
is then not known on the host yet: a negative id -(i + 1) stands for "the token the previous
step sampled for its row i", read on the device from `last`, where each step leaves its tokens.
Every host-to-device copy leaves pinned memory without a sync, from one of two host buffers in
turn: the buffer a step fills was last read by the copy of the step before the previous one,
which the engine has waited for.
"""
from __future__ import annotations

import torch

from dynabatch.worker_svc.engine.attention import PagedMetadata
from dynabatch.worker_svc.engine.kv_cache import NULL_BLOCK, KVCache
from dynabatch.worker_svc.engine.sequence import Sequence


class HostBuffers:
    """Two pinned (rows, n) int64 host buffers used in turn (one is filled or read while the
    other's copy may still be pending); both grown when n is short."""

    def __init__(self, rows: int, width: int, pin: bool) -> None:
        self.rows, self.pin = rows, pin
        self.bufs = [self._new(width), self._new(width)]
        self.turn = 0

    def _new(self, width: int) -> torch.Tensor:
        return torch.zeros((self.rows, width), dtype=torch.int64, pin_memory=self.pin)

    def next(self, width: int) -> torch.Tensor:
        """The buffer for this step, at least `width` wide."""
        self.turn ^= 1
        if self.bufs[self.turn].shape[1] < width:
            # The old buffers are not reused before their pending copies finish: torch's
            # pinned-memory allocator records the copies' streams.
            self.bufs = [self._new(2 * width), self._new(2 * width)]
        return self.bufs[self.turn]


class DecodeInputs:
    IDS, POS, ROW = range(3)

    def __init__(self, kv: KVCache, device: torch.device, max_rows: int, max_batch: int,
                 table_width: int) -> None:
        self.kv = kv
        self.device = device
        self.block_size = kv.block_size
        self.null_row = max_rows
        self.table = torch.full((max_rows + 1, table_width), NULL_BLOCK, dtype=torch.int32,
                                device=device)
        pin = device.type == "cuda"
        self._rows = HostBuffers(3, max_batch, pin)
        self._updates = HostBuffers(3, 256, pin)
        self.buf = torch.zeros((3, max_batch), dtype=torch.int64, device=device)
        self.buf[self.ROW] = self.null_row
        self.last = torch.zeros(max_batch, dtype=torch.int64, device=device)

    def stage(self, seqs: list[Sequence], padded: int) -> None:
        """Copy this step's rows (padded up to `padded` with null rows) and new table entries."""
        n = len(seqs)
        host = self._rows.next(padded)
        h = host.numpy()
        h[self.IDS, :n] = [s.tokens[-1] for s in seqs]
        h[self.POS, :n] = [s.num_computed for s in seqs]
        h[self.ROW, :n] = [s.row for s in seqs]
        h[:2, n:padded] = 0
        h[self.ROW, n:padded] = self.null_row
        self.stage_table(seqs)
        self.buf[:, :padded].copy_(host[:, :padded], non_blocking=True)

    def stage_table(self, seqs: list[Sequence]) -> None:
        """Copy the table entries the sequences gained since they were last staged."""
        updates = [(s.row, c, s.table.blocks[c]) for s in seqs
                   for c in range(s.synced, len(s.table.blocks))]
        if not updates:
            return
        for s in seqs:
            s.synced = len(s.table.blocks)
        host = self._updates.next(len(updates))
        host[:, :len(updates)] = torch.tensor(updates, dtype=torch.int64).T
        upd = host[:, :len(updates)].to(self.device, non_blocking=True)
        self.table[upd[0], upd[1]] = upd[2].to(torch.int32)

    def keep_sampled(self, tokens: torch.Tensor) -> None:
        """Leave a step's sampled tokens [n] where the next step's negative ids find them."""
        self.last[: tokens.shape[0]].copy_(tokens)

    def device_meta(self, b: int) -> tuple[torch.Tensor, torch.Tensor, PagedMetadata]:
        """(ids, positions, metadata) of the first b staged rows, computed on the device."""
        raw, pos, rows = self.buf[self.IDS, :b], self.buf[self.POS, :b], self.buf[self.ROW, :b]
        ids = torch.where(raw >= 0, raw, self.last.gather(0, (-1 - raw).clamp(min=0)))
        table = self.table.index_select(0, rows)
        blocks = table.gather(1, (pos // self.block_size)[:, None])[:, 0].long()
        meta = PagedMetadata(kv=self.kv.data, write_blocks=blocks,
                             write_offsets=pos % self.block_size, block_tables=table,
                             context_lens=(pos + 1).to(torch.int32), decode=True)
        return ids, pos, meta
