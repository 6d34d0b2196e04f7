"""The batching policy: pure functions, state and budget in, a decision out."""
