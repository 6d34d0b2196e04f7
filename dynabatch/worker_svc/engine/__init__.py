"""The engine: runs the model with continuous batching over a paged KV cache (see api.py)."""
