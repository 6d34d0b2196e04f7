"""Redis errors as the queue's, and URLs fit for logs (the Redis backend's edges)."""
from __future__ import annotations

import functools

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dynabatch.wire.queue import QueueError, QueueUnavailable


def guarded(method):
    """Map redis-py errors to the queue's: QueueUnavailable (retry later) or QueueError."""
    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise QueueUnavailable(f"redis unreachable: {type(e).__name__}") from e
        except RedisError as e:
            raise QueueError(f"redis error: {e}") from e
    return wrapper


def redact(url: str) -> str:
    """The URL without its password (for logs)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in creds else f"{scheme}{sep}***@{host}"
