from dynabatch.v1 import scheduler_pb2 as _scheduler_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkItem(_message.Message):
    __slots__ = ("request_id", "model", "prompt_token_ids", "max_tokens", "sampling", "stop_token_ids", "ignore_eos", "priority", "resume_token_ids", "scheduler_id", "attempt", "arrival_unix_ns", "predicted_output_tokens", "bin", "ttft_target_ms", "tpot_target_ms", "queue_deadline_unix_ns", "expected_output_tokens", "trace_context", "crashes")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BIN_FIELD_NUMBER: _ClassVar[int]
    TTFT_TARGET_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_TARGET_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEADLINE_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CRASHES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    sampling: _scheduler_pb2.SamplingParams
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    priority: _scheduler_pb2.Priority
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    scheduler_id: str
    attempt: int
    arrival_unix_ns: int
    predicted_output_tokens: int
    bin: int
    ttft_target_ms: int
    tpot_target_ms: int
    queue_deadline_unix_ns: int
    expected_output_tokens: int
    trace_context: _containers.ScalarMap[str, str]
    crashes: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_scheduler_pb2.SamplingParams, _Mapping]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., priority: _Optional[_Union[_scheduler_pb2.Priority, str]] = ..., resume_token_ids: _Optional[_Iterable[int]] = ..., scheduler_id: _Optional[str] = ..., attempt: _Optional[int] = ..., arrival_unix_ns: _Optional[int] = ..., predicted_output_tokens: _Optional[int] = ..., bin: _Optional[int] = ..., ttft_target_ms: _Optional[int] = ..., tpot_target_ms: _Optional[int] = ..., queue_deadline_unix_ns: _Optional[int] = ..., expected_output_tokens: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., crashes: _Optional[int] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("request_id", "token_ids", "offset", "finish_reason", "error", "worker_id", "preempted", "attempt", "worker_lost", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WORKER_LOST_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    finish_reason: _scheduler_pb2.FinishReason
    error: str
    worker_id: str
    preempted: bool
    attempt: int
    worker_lost: bool
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., finish_reason: _Optional[_Union[_scheduler_pb2.FinishReason, str]] = ..., error: _Optional[str] = ..., worker_id: _Optional[str] = ..., preempted: _Optional[bool] = ..., attempt: _Optional[int] = ..., worker_lost: _Optional[bool] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TokenDeltaBatch(_message.Message):
    __slots__ = ("deltas", "step_end_unix_ns")
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    STEP_END_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    deltas: _containers.RepeatedCompositeFieldContainer[TokenDelta]
    step_end_unix_ns: int
    def __init__(self, deltas: _Optional[_Iterable[_Union[TokenDelta, _Mapping]]] = ..., step_end_unix_ns: _Optional[int] = ...) -> None: ...

class WorkerFeedback(_message.Message):
    __slots__ = ("worker_id", "model", "running", "waiting", "kv_blocks_total", "kv_blocks_used", "kv_block_size", "decode_step_ms", "decode_batch_size", "prefill_tokens_per_s", "max_model_len", "steps", "preemptions", "unix_ns", "accepting", "max_running", "step_prefill_tokens")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTING_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    STEP_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    model: str
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_block_size: int
    decode_step_ms: float
    decode_batch_size: float
    prefill_tokens_per_s: float
    max_model_len: int
    steps: int
    preemptions: int
    unix_ns: int
    accepting: bool
    max_running: int
    step_prefill_tokens: int
    def __init__(self, worker_id: _Optional[str] = ..., model: _Optional[str] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., decode_step_ms: _Optional[float] = ..., decode_batch_size: _Optional[float] = ..., prefill_tokens_per_s: _Optional[float] = ..., max_model_len: _Optional[int] = ..., steps: _Optional[int] = ..., preemptions: _Optional[int] = ..., unix_ns: _Optional[int] = ..., accepting: _Optional[bool] = ..., max_running: _Optional[int] = ..., step_prefill_tokens: _Optional[int] = ...) -> None: ...

class WorkerControl(_message.Message):
    __slots__ = ("cancel_request_ids", "step_prefill_tokens")
    CANCEL_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    STEP_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    cancel_request_ids: _containers.RepeatedScalarFieldContainer[str]
    step_prefill_tokens: int
    def __init__(self, cancel_request_ids: _Optional[_Iterable[str]] = ..., step_prefill_tokens: _Optional[int] = ...) -> None: ...
