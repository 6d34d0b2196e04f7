"""Building requests and collecting results: shared by the sync and async clients."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from dynabatch.v1 import scheduler_pb2 as pb

FINISH_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                pb.FINISH_REASON_CANCELLED: "cancelled", pb.FINISH_REASON_ERROR: "error"}
PRIORITIES = {"low": pb.PRIORITY_LOW, "normal": pb.PRIORITY_NORMAL, "high": pb.PRIORITY_HIGH}


def build_request(prompt: str | None = None, *, prompt_token_ids: list[int] | None = None,
                  max_tokens: int = 64, model: str = "", temperature: float = 0.0,
                  top_p: float = 0.0, top_k: int = 0, seed: int | None = None,
                  stop_token_ids: list[int] | None = None, ignore_eos: bool = False,
                  priority: str | int = 0, expected_output_tokens: int = 0,
                  ttft_target_ms: int = 0, tpot_target_ms: int = 0, max_queue_ms: int = 0,
                  request_id: str = "", skip_text: bool = False) -> pb.GenerateRequest:
    """Keyword arguments to a GenerateRequest (fields left unset take the server's defaults).

    Without a request_id one is chosen here, so that a broken stream can be resumed by id."""
    sampling = pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    if seed is not None:
        sampling.seed = seed
    if isinstance(priority, str):
        priority = PRIORITIES[priority]
    return pb.GenerateRequest(
        request_id=request_id or uuid.uuid4().hex, model=model, prompt=prompt or "",
        prompt_token_ids=prompt_token_ids or [], max_tokens=max_tokens, sampling=sampling,
        stop_token_ids=stop_token_ids or [], ignore_eos=ignore_eos, priority=priority,
        expected_output_tokens=expected_output_tokens, ttft_target_ms=ttft_target_ms,
        tpot_target_ms=tpot_target_ms, max_queue_ms=max_queue_ms, skip_text=skip_text)


@dataclass
class GenerateResult:
    """A whole generation: every token, the text, why it ended and the server's timings."""
    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    timings: pb.Timings | None = None

    def add(self, msg: pb.GenerateResponse) -> None:
        if msg.offset != len(self.token_ids):
            raise RuntimeError(f"stream gap: expected offset {len(self.token_ids)}, got {msg.offset}")
        self.request_id = msg.request_id
        self.token_ids.extend(msg.token_ids)
        self.text += msg.text
        if msg.finish_reason:
            self.finish_reason = FINISH_NAMES.get(msg.finish_reason, "unknown")
            self.timings = msg.timings
