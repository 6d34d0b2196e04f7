"""The start-up heap, out of the garbage collector's sight.

torch, transformers, a tokenizer, grpcio and protobuf's descriptors leave a few hundred thousand
long-lived objects behind at start-up. Python's full (generation-2) collection walks all of them
each time it runs (~0.1 s here, and it runs every few thousand requests under load): a pause
in which no token is relayed, no request admitted and, in the engine process, no step launched.
gc.freeze() moves them to the permanent generation once start-up is over; objects made while
serving are collected as before.
"""
from __future__ import annotations

import gc

_frozen = False


def freeze_startup_heap() -> bool:
    """Freeze once per process (later calls do nothing); True on the call that froze."""
    global _frozen
    if _frozen:
        return False
    _frozen = True
    gc.collect()          # what start-up left as garbage is freed, not frozen
    gc.freeze()
    return True
