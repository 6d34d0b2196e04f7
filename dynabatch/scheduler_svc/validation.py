"""Request validation: a GenerateRequest in, a WorkItem out, or an error naming the field."""
from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from dynabatch.v1.scheduler_pb2 import GenerateRequest
from dynabatch.v1.worker_pb2 import WorkItem

_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_STOP_IDS = 64


class InvalidRequest(ValueError):
    """A client error; the message names the offending field."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    tokenizer: object     # a transformers tokenizer (encode / decode)


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 32_768
    max_prompt_chars: int = 1 << 20
    default_max_queue_ms: int = 60_000
    # Share of a request's TTFT target that admission control keeps free of queueing (prefill,
    # first step, error of the wait estimate): admitted only if the wait fits in the rest.
    admission_headroom: float = 0.3
    # Least time between two messages of a stream: faster steps are coalesced into one message.
    stream_flush_s: float = 0.02


class RandomIds:
    """Ids for requests that come without one: 128 random bits from the OS (os.urandom) as 32
    hex digits, drawn `batch` ids at a time. os.urandom releases the GIL, and with another
    thread runnable (the gRPC poller, an in-process engine) every release can cost the event
    loop a wait for the GIL: one per request with uuid4. A forked child draws afresh."""

    def __init__(self, batch: int = 256) -> None:
        self.batch = batch
        self._hex, self._next = "", 0
        os.register_at_fork(after_in_child=self._drop)

    def _drop(self) -> None:
        self._hex, self._next = "", 0

    def __call__(self) -> str:
        if self._next >= len(self._hex):
            self._hex, self._next = os.urandom(16 * self.batch).hex(), 0
        start, self._next = self._next, self._next + 32
        return self._hex[start:self._next]


new_request_id = RandomIds()


def validate(req: GenerateRequest, models: dict[str, ModelInfo], default_model: str,
             limits: Limits, scheduler_id: str, arrival_unix_ns: int) -> WorkItem:
    """Check every field and tokenize the prompt. Raises InvalidRequest."""
    rid = req.request_id or new_request_id()
    if not _ID.match(rid):
        raise InvalidRequest("request_id: use 1-128 of [A-Za-z0-9._-]")
    name = req.model or default_model
    info = models.get(name)
    if info is None:
        raise InvalidRequest(f"model: unknown model {name!r}; served: {sorted(models)}")
    prompt = _prompt_ids(req, info, limits)
    _check_generation(req, info, len(prompt))
    queue_ms = req.max_queue_ms or limits.default_max_queue_ms
    return WorkItem(
        request_id=rid, model=name, prompt_token_ids=prompt, max_tokens=req.max_tokens,
        sampling=req.sampling, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
        priority=req.priority or 2, scheduler_id=scheduler_id, arrival_unix_ns=arrival_unix_ns,
        ttft_target_ms=req.ttft_target_ms, tpot_target_ms=req.tpot_target_ms,
        expected_output_tokens=req.expected_output_tokens,
        queue_deadline_unix_ns=arrival_unix_ns + queue_ms * 1_000_000)


def _prompt_ids(req: GenerateRequest, info: ModelInfo, limits: Limits) -> Sequence[int]:
    if req.prompt and req.prompt_token_ids:
        raise InvalidRequest("prompt: set either prompt or prompt_token_ids, not both")
    if req.prompt_token_ids:
        # the repeated field itself, not a list of it: WorkItem copies it in C (from a list, one
        # Python int at a time: ~40x slower, 2000 tokens ~75 us)
        ids = req.prompt_token_ids
        bad = next((t for t in ids if t < 0 or t >= info.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"prompt_token_ids: {bad} is outside the vocabulary [0, {info.vocab_size})")
    elif req.prompt:
        if len(req.prompt) > limits.max_prompt_chars:
            raise InvalidRequest(f"prompt: longer than {limits.max_prompt_chars} characters")
        ids = info.tokenizer.encode(req.prompt, add_special_tokens=False)
    else:
        raise InvalidRequest("prompt: empty; set prompt or prompt_token_ids")
    if not ids:
        raise InvalidRequest("prompt: tokenizes to nothing")
    if len(ids) > limits.max_prompt_tokens:
        raise InvalidRequest(f"prompt: {len(ids)} tokens exceed the limit of {limits.max_prompt_tokens}")
    return ids


def _check_generation(req: GenerateRequest, info: ModelInfo, prompt_len: int) -> None:
    if req.max_tokens <= 0:
        raise InvalidRequest("max_tokens: must be > 0")
    if prompt_len + req.max_tokens > info.max_model_len:
        raise InvalidRequest(f"max_tokens: prompt ({prompt_len}) + max_tokens ({req.max_tokens}) "
                             f"exceeds the model's context of {info.max_model_len} tokens")
    s = req.sampling
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise InvalidRequest("sampling.temperature: must be a finite number >= 0")
    if not math.isfinite(s.top_p) or s.top_p < 0 or s.top_p > 1:
        raise InvalidRequest("sampling.top_p: must be in (0, 1] (0 means unset = 1)")
    if s.top_k < 0:
        raise InvalidRequest("sampling.top_k: must be >= 0")
    if len(req.stop_token_ids) > MAX_STOP_IDS:
        raise InvalidRequest(f"stop_token_ids: at most {MAX_STOP_IDS}")
    if any(t < 0 or t >= info.vocab_size for t in req.stop_token_ids):
        raise InvalidRequest("stop_token_ids: outside the vocabulary")
    if req.expected_output_tokens < 0:
        raise InvalidRequest("expected_output_tokens: must be >= 0")
    if req.priority not in (0, 1, 2, 3):
        raise InvalidRequest("priority: unknown value")
