"""Decode-step inputs with minimal host work: a device-resident block table, three ints per row.

Every running sequence owns a row of a device block table for as long as it runs (the
scheduler hands rows out). A step sends only (token id, position, row) per sequence plus the
table entries added since the sequence was last staged; slots, context lengths and the batch's
table rows are derived on the device, inside the CUDA graph when one is used. Row `max_rows`
is all zeros: padded batch rows point at it, so they read and write the scratch block only.
"""
from __future__ import annotations

import torch

from dynabatch.worker_svc.engine.attention import PagedMetadata
from dynabatch.worker_svc.engine.kv_cache import NULL_BLOCK, KVCache
from dynabatch.worker_svc.engine.sequence import Sequence


class DecodeInputs:
    IDS, POS, ROW = range(3)

    def __init__(self, kv: KVCache, device: torch.device, max_rows: int, max_batch: int,
                 table_width: int) -> None:
        self.kv = kv
        self.block_size = kv.block_size
        self.null_row = max_rows
        self.table = torch.full((max_rows + 1, table_width), NULL_BLOCK, dtype=torch.int32,
                                device=device)
        pin = device.type == "cuda"
        self.host = torch.zeros((3, max_batch), dtype=torch.int64, pin_memory=pin)
        self.host_np = self.host.numpy()
        self.buf = torch.zeros((3, max_batch), dtype=torch.int64, device=device)
        self.buf[self.ROW] = self.null_row

    def stage(self, seqs: list[Sequence], padded: int) -> None:
        """Copy this step's rows (padded up to `padded` with null rows) and new table entries."""
        n = len(seqs)
        h = self.host_np
        h[self.IDS, :n] = [s.tokens[-1] for s in seqs]
        h[self.POS, :n] = [s.num_computed for s in seqs]
        h[self.ROW, :n] = [s.row for s in seqs]
        h[:2, n:padded] = 0
        h[self.ROW, n:padded] = self.null_row
        rows, cols, vals = [], [], []
        for s in seqs:
            blocks = s.table.blocks
            if len(blocks) > s.synced:
                for c in range(s.synced, len(blocks)):
                    rows.append(s.row)
                    cols.append(c)
                    vals.append(blocks[c])
                s.synced = len(blocks)
        if rows:
            upd = torch.tensor([rows, cols, vals], dtype=torch.int64).to(self.table.device)
            self.table[upd[0], upd[1]] = upd[2].to(torch.int32)
        self.buf[:, :padded].copy_(self.host[:, :padded], non_blocking=True)

    def device_meta(self, b: int) -> tuple[torch.Tensor, torch.Tensor, PagedMetadata]:
        """(ids, positions, metadata) of the first b staged rows, computed on the device."""
        ids, pos, rows = self.buf[self.IDS, :b], self.buf[self.POS, :b], self.buf[self.ROW, :b]
        table = self.table.index_select(0, rows)
        blocks = table.gather(1, (pos // self.block_size)[:, None])[:, 0].long()
        meta = PagedMetadata(kv=self.kv.data, write_blocks=blocks,
                             write_offsets=pos % self.block_size, block_tables=table,
                             context_lens=(pos + 1).to(torch.int32), decode=True)
        return ids, pos, meta
