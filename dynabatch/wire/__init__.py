"""Shared ground floor: queue interface and backends, key layout, model registry."""
