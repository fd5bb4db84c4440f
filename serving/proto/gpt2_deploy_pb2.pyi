from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("do_sample", "temperature", "top_k", "top_p", "seed")
    DO_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, do_sample: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("text", "token_ids", "max_new_tokens", "sampling", "stop_token_ids", "stop_strings", "ignore_eos")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    max_new_tokens: int
    sampling: SamplingParams
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop_strings: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., stop_strings: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class Finish(_message.Message):
    __slots__ = ("reason", "prompt_tokens", "completion_tokens", "token_ids", "text", "time_to_first_token_s", "per_token_s")
    REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    PER_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    time_to_first_token_s: float
    per_token_s: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., time_to_first_token_s: _Optional[float] = ..., per_token_s: _Optional[_Iterable[float]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_ids", "text", "finish")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish: Finish
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish: _Optional[_Union[Finish, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("text", "token_ids", "top_k")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    top_k: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., top_k: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("token_ids", "token_logprobs", "logits", "top_ids", "top_logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    logits: Tensor
    top_ids: Tensor
    top_logprobs: Tensor
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., token_logprobs: _Optional[_Iterable[float]] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., top_ids: _Optional[_Union[Tensor, _Mapping]] = ..., top_logprobs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("name", "source", "precision", "backend", "device", "n_layer", "n_head", "n_embd", "vocab_size", "n_positions", "eos_token_id", "parity_mode", "canary", "backend_info_json", "canary_report_json", "ready", "kserve_models", "not_serving_reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    N_LAYER_FIELD_NUMBER: _ClassVar[int]
    N_HEAD_FIELD_NUMBER: _ClassVar[int]
    N_EMBD_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    N_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PARITY_MODE_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    CANARY_REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    KSERVE_MODELS_FIELD_NUMBER: _ClassVar[int]
    NOT_SERVING_REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    precision: str
    backend: str
    device: str
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int
    eos_token_id: int
    parity_mode: str
    canary: str
    backend_info_json: str
    canary_report_json: str
    ready: bool
    kserve_models: _containers.RepeatedScalarFieldContainer[str]
    not_serving_reason: str
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., precision: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., n_layer: _Optional[int] = ..., n_head: _Optional[int] = ..., n_embd: _Optional[int] = ..., vocab_size: _Optional[int] = ..., n_positions: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., parity_mode: _Optional[str] = ..., canary: _Optional[str] = ..., backend_info_json: _Optional[str] = ..., canary_report_json: _Optional[str] = ..., ready: _Optional[bool] = ..., kserve_models: _Optional[_Iterable[str]] = ..., not_serving_reason: _Optional[str] = ...) -> None: ...

class CheckParityRequest(_message.Message):
    __slots__ = ("text", "token_ids", "max_new_tokens", "batched")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    max_new_tokens: int
    batched: bool
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., batched: _Optional[bool] = ...) -> None: ...

class ParityStep(_message.Message):
    __slots__ = ("case", "max_abs", "mean_abs", "top1_agreement", "positions", "passed")
    CASE_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    case: str
    max_abs: float
    mean_abs: float
    top1_agreement: float
    positions: int
    passed: bool
    def __init__(self, case: _Optional[str] = ..., max_abs: _Optional[float] = ..., mean_abs: _Optional[float] = ..., top1_agreement: _Optional[float] = ..., positions: _Optional[int] = ..., passed: _Optional[bool] = ...) -> None: ...

class CheckParityResponse(_message.Message):
    __slots__ = ("passed", "tolerance", "atol", "min_top1", "max_abs", "top1_agreement", "first_diverging_step", "steps", "report", "report_json", "served_backend", "reference_backend", "batch_sizes", "notes", "batched", "batched_vs_solo_passed", "batched_vs_solo_max_abs", "batched_vs_solo_first_diverging_step")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    ATOL_FIELD_NUMBER: _ClassVar[int]
    MIN_TOP1_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    FIRST_DIVERGING_STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    SERVED_BACKEND_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    BATCHED_FIELD_NUMBER: _ClassVar[int]
    BATCHED_VS_SOLO_PASSED_FIELD_NUMBER: _ClassVar[int]
    BATCHED_VS_SOLO_MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_VS_SOLO_FIRST_DIVERGING_STEP_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    tolerance: str
    atol: float
    min_top1: float
    max_abs: float
    top1_agreement: float
    first_diverging_step: int
    steps: _containers.RepeatedCompositeFieldContainer[ParityStep]
    report: str
    report_json: str
    served_backend: str
    reference_backend: str
    batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    notes: _containers.RepeatedScalarFieldContainer[str]
    batched: bool
    batched_vs_solo_passed: bool
    batched_vs_solo_max_abs: float
    batched_vs_solo_first_diverging_step: int
    def __init__(self, passed: _Optional[bool] = ..., tolerance: _Optional[str] = ..., atol: _Optional[float] = ..., min_top1: _Optional[float] = ..., max_abs: _Optional[float] = ..., top1_agreement: _Optional[float] = ..., first_diverging_step: _Optional[int] = ..., steps: _Optional[_Iterable[_Union[ParityStep, _Mapping]]] = ..., report: _Optional[str] = ..., report_json: _Optional[str] = ..., served_backend: _Optional[str] = ..., reference_backend: _Optional[str] = ..., batch_sizes: _Optional[_Iterable[int]] = ..., notes: _Optional[_Iterable[str]] = ..., batched: _Optional[bool] = ..., batched_vs_solo_passed: _Optional[bool] = ..., batched_vs_solo_max_abs: _Optional[float] = ..., batched_vs_solo_first_diverging_step: _Optional[int] = ...) -> None: ...
