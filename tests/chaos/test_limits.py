"""Size limits set on the command line: `dynabatch scheduler --max-prompt-tokens N
--max-message-bytes M` (a real scheduler process built from parsed flags, a fake worker).

Under the defaults (32,768 tokens, 8 MiB) every request here would be admitted, so each
rejection shows the flag reached the running server.
"""
from __future__ import annotations

import pytest

from dynabatch.client import AsyncDynabatchClient, InvalidArgument, ResourceExhausted

from .conftest import MODEL, expected_tokens, free_port, has_worker, purge, wait_for

MAX_PROMPT = 16
MAX_BYTES = 4096


@pytest.fixture
async def target(procs, redis_url, prefix):
    port = free_port()
    procs.worker(redis_url, prefix)
    procs.start("scheduler", "scheduler", "--redis-url", redis_url, "--redis-prefix", prefix,
                "--listen", f"127.0.0.1:{port}", "--model", MODEL, "--metrics-port", "0",
                "--max-prompt-tokens", str(MAX_PROMPT), "--max-message-bytes", str(MAX_BYTES))
    target = f"127.0.0.1:{port}"
    async with AsyncDynabatchClient(target, timeout=5, resume_retries=0) as client:
        await wait_for(lambda: has_worker(client), 60, "scheduler serving with a worker",
                       every_s=0.2)
    yield target
    await purge(redis_url, prefix)


async def test_max_prompt_tokens_flag(target):
    async with AsyncDynabatchClient(target, timeout=30, resume_retries=0) as client:
        at_limit = await client.generate(prompt_token_ids=[7] * MAX_PROMPT, max_tokens=4,
                                         ignore_eos=True)
        assert list(at_limit.token_ids) == expected_tokens(MAX_PROMPT, 4)
        with pytest.raises(InvalidArgument, match=f"{MAX_PROMPT + 1} tokens exceed the limit of "
                                                  f"{MAX_PROMPT}"):
            await client.generate(prompt_token_ids=[7] * (MAX_PROMPT + 1), max_tokens=4)
        with pytest.raises(InvalidArgument, match=f"exceed the limit of {MAX_PROMPT}"):
            await client.generate(prompt="x" * 100, max_tokens=4)     # text: counted as tokens
        ok = await client.generate(prompt="x" * MAX_PROMPT, max_tokens=2, ignore_eos=True)
        assert len(ok.token_ids) == 2


async def test_max_message_bytes_flag(target):
    """A request larger than the message limit is refused by gRPC itself (RESOURCE_EXHAUSTED)
    before it is parsed; one just under it reaches validation."""
    async with AsyncDynabatchClient(target, timeout=30, resume_retries=0) as client:
        with pytest.raises(ResourceExhausted, match="larger than max"):
            await client.generate(prompt="y" * (MAX_BYTES + 1), max_tokens=2)
        with pytest.raises(InvalidArgument, match="prompt"):        # decoded, then too long
            await client.generate(prompt="y" * (MAX_BYTES - 100), max_tokens=2)
        ok = await client.generate(prompt_token_ids=[3, 4], max_tokens=2, ignore_eos=True)
        assert len(ok.token_ids) == 2                               # the server is still fine
