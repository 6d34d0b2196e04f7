"""Shared fixtures: a real Redis on 127.0.0.1:6379 and a tiny model saved to disk."""
from __future__ import annotations

import os

import pytest
from hypothesis import settings

# CI runs the property tests derandomized: the same examples every run, so a red CI is a real
# regression (explore with random seeds locally: `pytest --hypothesis-seed=N`).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REDIS_URL = os.environ.get("DYNABATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _redis_up() -> bool:
    import redis
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.exceptions.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The test Redis; in CI its absence is a failure, locally a skip."""
    if not _redis_up():
        if os.environ.get("CI"):
            pytest.fail(f"no Redis at {REDIS_URL}; .ci/run should have started one")
        pytest.skip(f"no Redis at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """tiny-random-llama (seed 0) saved with save_pretrained, to load through from_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    from dynabatch.wire.models import byte_tokenizer, load_config

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config("tiny-random-llama"))
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)
